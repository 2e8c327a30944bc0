//! Device commands for the monitor and for `lks.run` scripts: listing devices, block I/O with
//! verifiable patterns, networking, entropy, vsock streams, benchmarks timed by the host, hostile
//! descriptor chains, the clock, counter and memory commands of pause and snapshot tests, a
//! memory writer for migration tests, and the journaling UDP service of fault-tolerance tests.
//! Every command prints one or more machine-readable lines `LKS <command> ...` (see the README for
//! each format).
//!
//! Memory a command allocates is released when it returns; device rings and buffers, allocated
//! when the devices were probed, stay, and so does `memfill`'s block.

mod blk;
mod clock;
mod dirty;
mod hostile;
mod journal;
mod memory;
mod net;
pub mod pattern;
mod rng;
mod vsock;

use crate::frames::Frames;
use crate::virtio::{parse_int, Devices};
use crate::{report, System};

/// The machine as the commands use it: the boot facts, the allocator and the devices.
pub struct Machine<'a> {
    /// What start-up found.
    pub system: &'a System,
    /// Free RAM for rings and buffers.
    pub frames: Frames,
    /// The virtio devices from the command line.
    pub devices: Devices,
    /// The block `memfill` filled last.
    fill: Option<memory::Fill>,
}

impl<'a> Machine<'a> {
    /// Probes the virtio devices the command line announces.
    pub fn new(system: &'a System) -> Self {
        let mut frames = Frames::new(&system.boot, system.mapped_end);
        let devices = Devices::probe(system, &mut frames);
        Machine {
            system,
            frames,
            devices,
            fill: None,
        }
    }

    /// Answers ARP and echo requests (and drops other traffic) on the network interface, if any.
    pub fn service_network(&mut self) {
        if let Some(net) = self.devices.net() {
            while let Some(datagram) = net.poll(None) {
                net.release(datagram);
            }
        }
    }

    /// Prepares for the CPU to sleep until an interrupt: asks the network device to interrupt on
    /// the next frame. False if the CPU must not sleep (frames waiting, or reception is polled).
    pub fn ready_to_sleep(&mut self) -> bool {
        match self.devices.net() {
            Some(net) => !net.dev.arm_rx_interrupt(),
            None => true,
        }
    }
}

/// The words of a command line, consumed left to right.
pub struct Args<'a> {
    rest: &'a [u8],
}

impl<'a> Args<'a> {
    /// Splits `line` (already without the command word).
    pub fn new(line: &'a [u8]) -> Self {
        Args {
            rest: line.trim_ascii(),
        }
    }

    /// The next word.
    pub fn word(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let end = self
            .rest
            .iter()
            .position(|b| *b == b' ')
            .unwrap_or(self.rest.len());
        let word = &self.rest[..end];
        self.rest = self.rest[end..].trim_ascii_start();
        Some(word)
    }

    /// The next word as a number (decimal or 0x hex).
    pub fn number(&mut self) -> Option<u64> {
        parse_int(self.word()?)
    }

    /// Everything not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

/// Help text for the device commands.
pub const HELP: &str = "  devices                          list virtio devices
  time                             the TSC frequency the kit uses, and where it came from
  clock                            the KVM clock and the TSC
  counter <interval_ms> [count]    a counter in guest memory, with both clocks, every interval
  memfill <MiB> <seed>             fill a block of RAM kept across commands with the pattern
  memcheck                         checksum that block again and compare it with the pattern
  memdirty <MiB> <MiB_per_s> <seconds> [tick_ms]   rewrite a block at a set rate, then check it
  blk <n> info|id|flush            block device facts, ID string, cache flush
  blk <n> write <sector> <count> <seed>   write the seeded pattern
  blk <n> read <sector> <count> [seed]    read, checksum, compare with the pattern
  blk <n> stream <sector> <count> <seed> <passes>   rewrite a range pass after pass, then check it
  net info                         MAC, address, counters
  net ping <ip> [count]            ICMP echo
  net udp-echo <port> [count]      echo UDP datagrams until count, \"stop\" or a key
  net udp-send <ip> <port> <count> <size>   numbered, checksummed datagrams
  net udp-stream <ip> <port> <size> [count] [interval_us]   paced numbered datagrams until stopped
  net udp-journal <port> [count]   journal REQ datagrams to the first blk device, flush, ACK
  net serve <seconds>              answer ARP and ping for a while
  rng <nbytes>                     read entropy
  vsock info|connect <port> <text>|listen <port> [seconds]
  bench blk-seq-read|blk-seq-write <n> <MiB>
  bench blk-rand-read <n> <requests> <qd>
  bench net-tx <ip> <port> <frames> <size>
  bench net-rx <port> <frames>
  hostile <n> <case>|all           malformed descriptor chains (try: hostile <n> list)
";

/// Runs a device command; false if `command` is not one.
pub fn execute(machine: &mut Machine, command: &[u8], args: &mut Args) -> bool {
    let mark = machine.frames.mark();
    match command {
        b"devices" => {
            machine.devices.report();
            report::line(format_args!("devices count={}", machine.devices.len()));
        }
        b"time" => report::line(format_args!(
            "time tsc_hz={} source={}",
            crate::time::tsc_hz(),
            crate::time::tsc_source()
        )),
        b"clock" => clock::clock(),
        b"counter" => clock::counter(args),
        b"memfill" => memory::fill(machine, args),
        b"memcheck" => memory::check(machine),
        b"memdirty" => dirty::command(machine, args),
        b"blk" => blk::command(machine, args),
        b"net" => net::command(machine, args),
        b"rng" => rng::command(machine, args),
        b"vsock" => vsock::command(machine, args),
        b"bench" => match args.word() {
            Some(b"blk-seq-read") => blk::bench_sequential(machine, args, false),
            Some(b"blk-seq-write") => blk::bench_sequential(machine, args, true),
            Some(b"blk-rand-read") => blk::bench_random(machine, args),
            Some(b"net-tx") => net::bench_tx(machine, args),
            Some(b"net-rx") => net::bench_rx(machine, args),
            _ => usage(
                "bench",
                "blk-seq-read|blk-seq-write|blk-rand-read|net-tx|net-rx ...",
            ),
        },
        b"hostile" => hostile::command(machine, args),
        _ => return false,
    }
    machine.frames.release(mark);
    true
}

/// Prints `LKS <command> error=usage` and the expected arguments.
fn usage(command: &str, arguments: &str) {
    report::line(format_args!(
        "{command} error=usage expected=\"{arguments}\""
    ));
}

/// Prints `LKS <command> error=<reason>`.
fn error(command: &str, reason: &str) {
    report::line(format_args!("{command} error={reason}"));
}

/// Whether a key arrived on the serial console (consumed): how long-running commands are stopped.
/// Also where they notice Ctrl-Alt-Del on the keyboard (see [`crate::keyboard::check`]).
fn key_pressed() -> bool {
    crate::keyboard::check();
    crate::serial::COM1.try_read().is_some()
}
