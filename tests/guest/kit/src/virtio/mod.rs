//! virtio 1.x devices over virtio-mmio, found on the kernel command line the way QEMU's `microvm`
//! machine announces them: `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (size with an optional
//! K/M/G suffix). Each device is reset, negotiated and brought up by its driver; completions are
//! polled at CPL3 or taken by interrupt (the device's IOAPIC pin, edge-triggered, woken in the CPL0
//! wait service), as `lks.virtio=poll|irq` says.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
pub mod vsock;

use crate::net::{Interface, Ipv4Config};
use crate::platform::IsaRoute;
use crate::time::Deadline;
use crate::{apic, cpu, report, System};
use mmio::{InitError, Transport};
use queue::Virtqueue;

/// Most devices the kit drives.
pub const MAX_DEVICES: usize = 16;
/// Device n interrupts on vector `VECTOR_BASE + n`.
const VECTOR_BASE: u8 = cpu::IRQ_BASE + 8;
/// Longest sleep of an interrupt-driven wait between looks at the queue (microseconds).
const WAKE_US: u64 = 1000;

/// How a driver learns that the device used buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Spin on the used ring at CPL3; the device is asked not to interrupt.
    Poll,
    /// Sleep in the CPL0 wait service until the device's interrupt.
    Interrupt,
}

impl Completion {
    /// Sets the queue's interrupt suppression to match.
    pub fn prepare(self, queue: &mut Virtqueue) {
        match self {
            Completion::Poll => queue.disable_interrupts(),
            Completion::Interrupt => queue.enable_interrupts(),
        }
    }

    /// The name used in result lines (`mode=<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Completion::Poll => "poll",
            Completion::Interrupt => "irq",
        }
    }
}

/// A bounded wait for used buffers.
pub struct Waiter {
    deadline: Deadline,
}

impl Waiter {
    /// Gives up `timeout_ms` milliseconds from now.
    pub fn new(timeout_ms: u64) -> Self {
        Waiter {
            deadline: Deadline::after_ms(timeout_ms),
        }
    }

    /// Waits until `queue` has used buffers (true) or the time is up (false). With interrupts,
    /// the device is asked for one, InterruptStatus is acknowledged, and the CPU sleeps until it
    /// (or a 1 ms timer) arrives.
    pub fn wait(
        &self,
        transport: &Transport,
        queue: &mut Virtqueue,
        completion: Completion,
    ) -> bool {
        loop {
            if queue.has_used() {
                return true;
            }
            if self.deadline.passed() {
                return false;
            }
            match completion {
                Completion::Poll => core::hint::spin_loop(),
                Completion::Interrupt => {
                    cpu::take_pending_irqs();
                    queue.enable_interrupts();
                    transport.ack_interrupt();
                    if queue.has_used() {
                        return true;
                    }
                    crate::time::nap_us(WAKE_US);
                }
            }
        }
    }
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of the register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Global system interrupt (IOAPIC input).
    pub irq: u32,
    /// The optional platform-device id after a second colon.
    pub id: Option<u32>,
}

impl MmioSlot {
    /// Parses `<size>@<base>:<irq>[:<id>]`.
    pub fn parse(text: &[u8]) -> Option<Self> {
        let at = text.iter().position(|b| *b == b'@')?;
        let size = parse_size(&text[..at])?;
        let mut rest = text[at + 1..].split(|b| *b == b':');
        let base = parse_int(rest.next()?)?;
        let irq = u32::try_from(parse_int(rest.next()?)?).ok()?;
        let id = match rest.next() {
            Some(id) => Some(u32::try_from(parse_int(id)?).ok()?),
            None => None,
        };
        (rest.next().is_none() && size != 0).then_some(MmioSlot {
            base,
            size,
            irq,
            id,
        })
    }
}

/// A number in decimal or `0x` hex.
pub fn parse_int(text: &[u8]) -> Option<u64> {
    let text = core::str::from_utf8(text).ok()?;
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A number with an optional K, M or G suffix (binary multiples), as Linux's `memparse`.
fn parse_size(text: &[u8]) -> Option<u64> {
    let (digits, shift) = match text.last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_int(digits)?.checked_mul(1 << shift)
}

/// The driver behind a device.
pub enum Driver {
    /// virtio-blk.
    Blk(blk::Blk),
    /// virtio-net with the network stack.
    Net(Interface),
    /// virtio-rng.
    Rng(rng::Rng),
    /// virtio-vsock.
    Vsock(vsock::Vsock),
    /// A type the kit has no driver for, or a device that failed to come up.
    None,
}

/// One announced device.
pub struct Device {
    /// Where the command line put it.
    pub slot: MmioSlot,
    /// Its register window.
    pub transport: Transport,
    /// Device type (0 if the window did not identify).
    pub device_id: u32,
    /// Features the device offered.
    pub offered: u64,
    /// Why it is not driven, if it is not.
    pub error: Option<InitError>,
    /// How completions are waited for.
    pub completion: Completion,
    /// The driver.
    pub driver: Driver,
}

/// The name of a virtio device type.
pub fn type_name(device_id: u32) -> &'static str {
    match device_id {
        0 => "none",
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        26 => "fs",
        _ => "other",
    }
}

impl Device {
    fn probe(
        slot: MmioSlot,
        completion: Completion,
        frames: &mut crate::frames::Frames,
        ip: Option<Ipv4Config>,
    ) -> Self {
        let transport = Transport::new(slot.base);
        let mut device = Device {
            slot,
            transport,
            device_id: 0,
            offered: 0,
            error: None,
            completion,
            driver: Driver::None,
        };
        if let Err(error) = transport.identify() {
            if error != InitError::BadMagic {
                device.device_id = transport.device_id();
            }
            device.error = Some(error);
            return device;
        }
        device.device_id = transport.device_id();
        device.offered = transport.device_features();
        let driver = match device.device_id {
            1 => net::Net::probe(transport, frames, completion)
                .map(|dev| Driver::Net(Interface::new(dev, ip))),
            2 => blk::Blk::probe(transport, frames, completion).map(Driver::Blk),
            4 => rng::Rng::probe(transport, frames, completion).map(Driver::Rng),
            19 => vsock::Vsock::probe(transport, frames, completion).map(Driver::Vsock),
            _ => Ok(Driver::None),
        };
        match driver {
            Ok(driver) => device.driver = driver,
            Err(error) => device.error = Some(error),
        }
        device
    }

    /// Negotiated features (0 without a driver).
    pub fn features(&self) -> u64 {
        match &self.driver {
            Driver::Blk(d) => d.features,
            Driver::Net(i) => i.dev.features,
            Driver::Rng(d) => d.features,
            Driver::Vsock(d) => d.features,
            Driver::None => 0,
        }
    }

    /// Resets the device and brings it up again with the memory it had.
    pub fn reinit(&mut self) -> Result<(), InitError> {
        match &mut self.driver {
            Driver::Blk(d) => d.reinit(),
            Driver::Net(i) => i.dev.reinit(),
            Driver::Rng(d) => d.reinit(),
            Driver::Vsock(d) => d.reinit(),
            Driver::None => Err(InitError::SetupFailed),
        }
    }

    /// Prints `LKS virtio dev=<n> type=<t> base=<0x..> irq=<n> features=<0x..> ...`.
    pub fn report(&self, n: usize) {
        let mut console = report::ConsoleGuard::lock();
        console.write(format_args!(
            "LKS virtio dev={n} type={} base={:#x} irq={} features={:#x} offered={:#x} mode={} irqs={}",
            type_name(self.device_id),
            self.slot.base,
            self.slot.irq,
            self.features(),
            self.offered,
            self.completion.name(),
            cpu::irqs_seen(VECTOR_BASE + n as u8),
        ));
        match &self.driver {
            Driver::Blk(d) => console.write(format_args!(
                " capacity={} ro={}",
                d.capacity,
                u8::from(d.read_only())
            )),
            Driver::Net(i) => console.write(format_args!(
                " mac={}",
                crate::net::wire::ShowMac(i.dev.mac)
            )),
            Driver::Vsock(d) => console.write(format_args!(" cid={}", d.guest_cid)),
            Driver::Rng(_) | Driver::None => {}
        }
        if let Some(error) = self.error {
            console.write(format_args!(" error={}", error.name()));
        }
        console.write(format_args!("\n"));
    }
}

/// Every device the command line announced, in its order (device n is the n-th entry).
pub struct Devices {
    list: [Option<Device>; MAX_DEVICES],
    count: usize,
}

impl Devices {
    /// Probes every announced device. Interrupts are routed (edge-triggered, active high, to
    /// this CPU) unless `lks.virtio=poll` or no IOAPIC carries the device's GSI.
    pub fn probe(system: &System, frames: &mut crate::frames::Frames) -> Self {
        let mut want_irq = true;
        for (key, value) in system.boot.cmdline_options() {
            match (key, value) {
                (b"lks.virtio", b"poll") => want_irq = false,
                (b"lks.virtio", b"irq") => want_irq = true,
                _ => {}
            }
        }
        let ip = Ipv4Config::from_cmdline(&system.boot);
        let mut devices = Devices {
            list: [const { None }; MAX_DEVICES],
            count: 0,
        };
        let slots = system
            .boot
            .cmdline_options()
            .filter(|(key, _)| *key == b"virtio_mmio.device")
            .filter_map(|(_, value)| MmioSlot::parse(value));
        for slot in slots.take(MAX_DEVICES) {
            let vector = VECTOR_BASE + devices.count as u8;
            let routed = want_irq
                && system
                    .platform
                    .route(IsaRoute::edge(slot.irq), vector, apic::local_apic_id());
            let completion = if routed {
                Completion::Interrupt
            } else {
                Completion::Poll
            };
            devices.list[devices.count] = Some(Device::probe(slot, completion, frames, ip));
            devices.count += 1;
        }
        devices
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the command line announced none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Device `n`.
    pub fn get(&mut self, n: usize) -> Option<&mut Device> {
        self.list.get_mut(n)?.as_mut()
    }

    /// Prints one `LKS virtio` line per device.
    pub fn report(&self) {
        for (n, device) in self.list[..self.count].iter().flatten().enumerate() {
            device.report(n);
        }
    }

    /// The first network interface.
    pub fn net(&mut self) -> Option<&mut Interface> {
        self.list
            .iter_mut()
            .flatten()
            .find_map(|d| match &mut d.driver {
                Driver::Net(interface) => Some(interface),
                _ => None,
            })
    }

    /// The first entropy device.
    pub fn rng(&mut self) -> Option<&mut rng::Rng> {
        self.list
            .iter_mut()
            .flatten()
            .find_map(|d| match &mut d.driver {
                Driver::Rng(rng) => Some(rng),
                _ => None,
            })
    }

    /// The first vsock device.
    pub fn vsock(&mut self) -> Option<&mut vsock::Vsock> {
        self.list
            .iter_mut()
            .flatten()
            .find_map(|d| match &mut d.driver {
                Driver::Vsock(vsock) => Some(vsock),
                _ => None,
            })
    }

    /// Device `n` if it is a block device.
    pub fn blk(&mut self, n: usize) -> Option<&mut blk::Blk> {
        match &mut self.get(n)?.driver {
            Driver::Blk(blk) => Some(blk),
            _ => None,
        }
    }
}
