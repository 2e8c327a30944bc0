//! Puts the VM's devices on its buses and wires their interrupts to KVM. Device logic itself is
//! in the `lockstep-devices` crate.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use lockstep_devices::legacy::{
    SerialDevice, COM1_IRQ, COM1_PORT, I8042, I8042_IRQ, I8042_PORT, I8042_PORT_LEN,
    SERIAL_PORT_LEN,
};
use lockstep_devices::metrics::Counters;
use lockstep_devices::virtio::block::{
    Block, BlockConfig, BlockMetrics, EpochBlocks, ReplicaError,
};
use lockstep_devices::virtio::mmio::{MmioTransport, QueueNotifier, MMIO_WINDOW_SIZE};
use lockstep_devices::virtio::net::{Net, NetConfig, NetMetrics};
use lockstep_devices::virtio::rng::{Rng, RngMetrics};
use lockstep_devices::virtio::vsock::{Vsock, VsockConfig, VsockConnState, VsockMetrics};
use lockstep_devices::virtio::{VirtioDevice, VirtioInterrupt};
use lockstep_devices::EventFdTrigger;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;
use crate::vcpu::IoBuses;
use crate::x86_64::layout::{IOAPIC_PINS, VIRTIO_MMIO_START};

/// The first IOAPIC pin given to virtio devices: 0-4 are the ISA timer, keyboard, cascade and
/// serial lines.
const FIRST_VIRTIO_IRQ: u32 = 5;

/// Why a device could not be added.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An eventfd could not be made.
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        /// The device.
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the interrupt line.
    #[error("cannot connect {what} to IRQ {irq}: {source}")]
    Irqfd {
        /// The device.
        what: String,
        /// The interrupt line.
        irq: u32,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Two devices claimed the same addresses.
    #[error("cannot place {what} on its bus: {source}")]
    Bus {
        /// The device.
        what: String,
        /// The conflict.
        #[source]
        source: lockstep_devices::bus::BusError,
    },
    /// Every virtio slot (MMIO window and IOAPIC pin) is taken.
    #[error("no room for {0}: every virtio interrupt line is in use")]
    NoSlot(String),
    /// A device's backend (its file, its tap) could not be opened.
    #[error("{field}: {message}")]
    Backend {
        /// The config field at fault, e.g. `drives[0].path_on_host`.
        field: String,
        /// What went wrong.
        message: String,
    },
    /// No drive has this id.
    #[error("no drive with id {0}")]
    NoDrive(String),
    /// Reading a drive's blocks for replication failed.
    #[error("drive {drive_id}: {source}")]
    Replica {
        /// The drive.
        drive_id: String,
        /// What failed.
        #[source]
        source: ReplicaError,
    },
}

fn eventfd(what: &str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
        what: what.to_string(),
        source,
    })
}

/// Queue doorbells as KVM ioeventfds on the VM.
struct KvmNotifier(Arc<VmFd>);

impl QueueNotifier for KvmNotifier {
    fn register(&self, evt: &EventFd, addr: u64, queue: u32) -> std::io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), queue)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, evt: &EventFd, addr: u64, queue: u32) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), queue)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Where a virtio device sits: its MMIO window and interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// Base of the 4 KiB window.
    pub base: u64,
    /// IOAPIC pin.
    pub irq: u32,
}

impl VirtioSlot {
    /// The kernel command-line entry that announces the device (as QEMU's microvm does).
    pub fn cmdline_entry(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }
}

/// A virtio device attached to the VM, typed for its counters and saved state.
pub enum AttachedDevice {
    /// A drive.
    Block {
        /// The drive's id.
        id: String,
        /// The device.
        device: Arc<Mutex<Block>>,
        /// Its counters.
        metrics: Arc<BlockMetrics>,
    },
    /// A network interface.
    Net {
        /// The interface's id.
        id: String,
        /// The device.
        device: Arc<Mutex<Net>>,
        /// Its counters.
        metrics: Arc<NetMetrics>,
    },
    /// The socket device.
    Vsock {
        /// The device.
        device: Arc<Mutex<Vsock>>,
        /// Its counters.
        metrics: Arc<VsockMetrics>,
    },
    /// The entropy device.
    Rng {
        /// The device.
        device: Arc<Mutex<Rng>>,
        /// Its counters.
        metrics: Arc<RngMetrics>,
    },
}

/// A virtio device with its transport and slot.
pub struct VirtioEntry {
    /// Where it sits.
    pub slot: VirtioSlot,
    /// Its transport (registers).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The device itself.
    pub device: AttachedDevice,
}

/// A device's kind, its id (drive or interface id) and its counters.
pub type DeviceCounters = (&'static str, Option<String>, Arc<dyn Counters>);

/// A device just placed on the bus: itself, its slot and its transport.
type Attached<D> = (Arc<Mutex<D>>, VirtioSlot, Arc<Mutex<MmioTransport>>);

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    buses: IoBuses,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    i8042: Arc<Mutex<I8042>>,
    reset_evt: EventFd,
    virtio: Vec<VirtioEntry>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// Taps handed over by a same-host migration, by interface id: `add_net` uses them.
    passed_taps: BTreeMap<String, std::fs::File>,
    /// The vsock listener handed over by a same-host migration: `add_vsock` uses it.
    passed_vsock: Option<std::os::unix::net::UnixListener>,
    /// Output epochs closed so far (FT): the number every interface's gate returns too.
    output_epochs: u64,
}

impl DeviceManager {
    /// The buses with the i8042 reset line on them.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Result<Self, DeviceError> {
        let mut buses = IoBuses::default();
        let what = "the i8042";
        let reset_evt = eventfd(what)?;
        let reset_trigger = reset_evt
            .try_clone()
            .map_err(|source| DeviceError::EventFd {
                what: what.into(),
                source,
            })?;
        let keyboard_irq = eventfd(what)?;
        vm.register_irqfd(&keyboard_irq, I8042_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                what: what.into(),
                irq: I8042_IRQ,
                source,
            })?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new(reset_trigger),
            EventFdTrigger::new(keyboard_irq),
        )));
        buses
            .pio
            .insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                what: "the i8042".into(),
                source,
            })?;
        Ok(DeviceManager {
            vm,
            mem,
            buses,
            serial: None,
            i8042,
            reset_evt,
            virtio: Vec::new(),
            subscribers: Vec::new(),
            passed_taps: BTreeMap::new(),
            passed_vsock: None,
            output_epochs: 0,
        })
    }

    /// Adds COM1, writing to `out` and interrupting on IRQ 4.
    pub fn add_serial(&mut self, out: Box<dyn Write + Send>) -> Result<(), DeviceError> {
        let what = "the serial port";
        let irq = eventfd(what)?;
        self.vm
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(|source| DeviceError::Irqfd {
                what: what.into(),
                irq: COM1_IRQ,
                source,
            })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger::new(irq), out)));
        self.buses
            .pio
            .insert(serial.clone(), COM1_PORT, SERIAL_PORT_LEN)
            .map_err(|source| DeviceError::Bus {
                what: "COM1".into(),
                source,
            })?;
        self.serial = Some(serial);
        Ok(())
    }

    /// Takes the next virtio slot, creates the device's interrupt (a KVM irqfd on the slot's
    /// pin), builds the device with it, and puts its transport on the MMIO bus.
    fn add_virtio<D, F>(&mut self, what: &str, build: F) -> Result<Attached<D>, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
        F: FnOnce(Arc<VirtioInterrupt>) -> Result<D, DeviceError>,
    {
        let index = self.virtio.len() as u32;
        let irq = FIRST_VIRTIO_IRQ + index;
        if irq >= IOAPIC_PINS {
            return Err(DeviceError::NoSlot(what.to_string()));
        }
        let slot = VirtioSlot {
            base: VIRTIO_MMIO_START + u64::from(index) * MMIO_WINDOW_SIZE,
            irq,
        };
        let evt = eventfd(what)?;
        self.vm
            .register_irqfd(&evt, irq)
            .map_err(|source| DeviceError::Irqfd {
                what: what.into(),
                irq,
                source,
            })?;
        let device = Arc::new(Mutex::new(build(Arc::new(VirtioInterrupt::new(evt)))?));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device.clone(),
            self.mem.clone(),
            Box::new(KvmNotifier(self.vm.clone())),
            slot.base,
        )));
        self.buses
            .mmio
            .insert(transport.clone(), slot.base, MMIO_WINDOW_SIZE)
            .map_err(|source| DeviceError::Bus {
                what: what.into(),
                source,
            })?;
        self.subscribers.push(device.clone());
        Ok((device, slot, transport))
    }

    /// Adds a virtio-blk drive; `field` names its config entry for errors.
    pub fn add_block(
        &mut self,
        config: &BlockConfig,
        field: &str,
    ) -> Result<VirtioSlot, DeviceError> {
        let what = format!("drive {}", config.drive_id);
        let (device, slot, transport) = self.add_virtio(&what, |interrupt| {
            Block::new(config, interrupt).map_err(|e| DeviceError::Backend {
                field: format!("{field}.path_on_host"),
                message: format!("cannot open {}: {e}", config.path.display()),
            })
        })?;
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        self.virtio.push(VirtioEntry {
            slot,
            transport,
            device: AttachedDevice::Block {
                id: config.drive_id.clone(),
                device,
                metrics,
            },
        });
        Ok(slot)
    }

    /// Adds a virtio-net interface on its tap; `field` names its config entry for errors.
    pub fn add_net(&mut self, config: &NetConfig, field: &str) -> Result<VirtioSlot, DeviceError> {
        let what = format!("network interface {}", config.iface_id);
        let passed = self.passed_taps.remove(&config.iface_id);
        let (device, slot, transport) = self.add_virtio(&what, |interrupt| {
            match passed {
                Some(file) => Net::with_passed_tap(config, file, interrupt),
                None => Net::new(config, interrupt),
            }
            .map_err(|e| DeviceError::Backend {
                field: format!("{field}.host_dev_name"),
                message: e.to_string(),
            })
        })?;
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        self.virtio.push(VirtioEntry {
            slot,
            transport,
            device: AttachedDevice::Net {
                id: config.iface_id.clone(),
                device,
                metrics,
            },
        });
        Ok(slot)
    }

    /// Taps another process handed over (interface id, descriptor), for `add_net` to use
    /// instead of opening them.
    pub fn use_passed_taps(&mut self, taps: Vec<(String, std::fs::File)>) {
        self.passed_taps = taps.into_iter().collect();
    }

    /// The vsock listener another process handed over, for `add_vsock` to use instead of
    /// binding its socket.
    pub fn use_passed_vsock(&mut self, listener: Option<std::fs::File>) {
        self.passed_vsock =
            listener.map(|f| std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(f)));
    }

    /// The vsock device, locked, if the VM has one (there is at most one).
    fn vsock(&self) -> Option<std::sync::MutexGuard<'_, Vsock>> {
        self.virtio.iter().find_map(|entry| match &entry.device {
            AttachedDevice::Vsock { device, .. } => {
                Some(device.lock().unwrap_or_else(|p| p.into_inner()))
            }
            _ => None,
        })
    }

    /// Every open vsock connection's state with another descriptor on its host socket (none
    /// without a vsock device).
    pub fn vsock_connections(
        &self,
    ) -> std::io::Result<Vec<(VsockConnState, std::os::unix::net::UnixStream)>> {
        self.vsock()
            .map_or(Ok(Vec::new()), |device| device.hand_over_connections())
    }

    /// Connections a same-host migration handed over, for the vsock device's restore to adopt;
    /// false without a vsock device.
    pub fn use_handed_connections(
        &self,
        connections: Vec<(VsockConnState, std::os::unix::net::UnixStream)>,
    ) -> bool {
        self.vsock()
            .map(|mut device| device.use_handed_connections(connections))
            .is_some()
    }

    /// The VM runs here now: the vsock socket file handed over goes with its device.
    pub fn own_passed_sockets(&self) {
        if let Some(device) = self.vsock() {
            device.own_socket_file();
        }
    }

    /// Another descriptor on the vsock device's listener, and the flag that keeps its socket
    /// file when the device goes (for a same-host migration to set once the VM runs elsewhere).
    pub fn vsock_listener(
        &self,
    ) -> std::io::Result<Option<(std::fs::File, Arc<std::sync::atomic::AtomicBool>)>> {
        self.vsock().map(|device| device.hand_over()).transpose()
    }

    /// Another descriptor on every network interface's tap (interface id, descriptor), in the
    /// order they were added.
    pub fn tap_files(&self) -> std::io::Result<Vec<(String, std::fs::File)>> {
        self.virtio
            .iter()
            .filter_map(|entry| match &entry.device {
                AttachedDevice::Net { id, device, .. } => Some((id, device)),
                _ => None,
            })
            .map(|(id, device)| {
                let file = device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .tap_file()?;
                Ok((id.clone(), file))
            })
            .collect()
    }

    /// Every drive, locked, with its id, in the order they were added.
    fn drives(&self) -> impl Iterator<Item = (&String, std::sync::MutexGuard<'_, Block>)> {
        self.virtio.iter().filter_map(|entry| match &entry.device {
            AttachedDevice::Block { id, device, .. } => {
                Some((id, device.lock().unwrap_or_else(|p| p.into_inner())))
            }
            _ => None,
        })
    }

    /// Starts or stops recording which 4 KiB blocks guest writes touch, on every writable drive
    /// (FT pairing: start before the full copy of the images).
    pub fn track_disk_writes(&self, on: bool) {
        for (_, mut drive) in self.drives() {
            drive.track_writes(on);
        }
    }

    /// Every drive's blocks written since the last call (ascending), cleared, by drive id.
    pub fn take_written_blocks(&self) -> Vec<(String, Vec<u64>)> {
        self.drives()
            .map(|(id, mut drive)| (id.clone(), drive.take_written()))
            .collect()
    }

    /// Reads `blocks` of drive `drive_id`'s image into `out`, for an epoch (the VM is paused,
    /// so no request is half-done).
    pub fn read_disk_blocks(
        &self,
        drive_id: &str,
        blocks: &[u64],
        out: &mut EpochBlocks,
    ) -> Result<(), DeviceError> {
        let (_, drive) = self
            .drives()
            .find(|(id, _)| id.as_str() == drive_id)
            .ok_or_else(|| DeviceError::NoDrive(drive_id.to_string()))?;
        drive
            .read_blocks(blocks, out)
            .map_err(|source| DeviceError::Replica {
                drive_id: drive_id.to_string(),
                source,
            })
    }

    /// Every network interface's counters (the FT primary watches how much output is held).
    pub fn net_metrics(&self) -> Vec<Arc<NetMetrics>> {
        self.virtio
            .iter()
            .filter_map(|entry| match &entry.device {
                AttachedDevice::Net { metrics, .. } => Some(metrics.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every network interface, locked in turn, for the FT output gate's calls.
    fn each_net(&self, mut each: impl FnMut(&mut Net)) {
        for entry in &self.virtio {
            if let AttachedDevice::Net { device, .. } = &entry.device {
                each(&mut device.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
    }

    /// Turns the FT output gate of every network interface on (frames the guest sends are held
    /// until their epoch is released) or off (everything held is written first, then frames go
    /// straight to the tap). A fenced gate stays fenced. Runs on the VM's owner thread.
    pub fn gate_network_output(&self, on: bool) {
        self.each_net(|net| {
            if on {
                net.gate_output()
            } else {
                net.open_output()
            }
        });
    }

    /// Closes the open output epoch on every network interface and returns its number (from
    /// 1, one more each call). The manager keeps the number: each interface counts too, and
    /// as they are all created before the VM runs and only this call closes epochs, they agree.
    pub fn mark_output_epoch(&mut self) -> u64 {
        self.output_epochs += 1;
        let epoch = self.output_epochs;
        self.each_net(|net| {
            let own = net.mark_output_epoch();
            if own != epoch {
                log::error!(
                    "virtio-net {}: closed output epoch {own} where the VM closed {epoch}",
                    net.iface_id()
                );
            }
        });
        epoch
    }

    /// Writes every frame of the output epochs up to `upto` to the taps (what the tap cannot
    /// take yet goes when it is writable).
    pub fn release_output(&self, upto: u64, by: std::time::Instant) {
        self.each_net(|net| net.release_output_by(upto, Some(by)));
    }

    /// Fences every network interface's output for good (a primary that lost the arbiter):
    /// what is held is dropped and no frame reaches a tap again while the VM lives.
    pub fn fence_output(&self) {
        self.each_net(Net::fence_output);
    }

    /// Adds the virtio-vsock device, listening on its Unix socket.
    pub fn add_vsock(&mut self, config: &VsockConfig) -> Result<VirtioSlot, DeviceError> {
        let passed = self.passed_vsock.take();
        let (device, slot, transport) = self.add_virtio("the vsock device", |interrupt| {
            Vsock::with_listener(config, passed, interrupt).map_err(|e| DeviceError::Backend {
                field: "vsock.uds_path".into(),
                message: e.to_string(),
            })
        })?;
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        self.virtio.push(VirtioEntry {
            slot,
            transport,
            device: AttachedDevice::Vsock { device, metrics },
        });
        Ok(slot)
    }

    /// Adds the virtio-rng entropy device.
    pub fn add_rng(&mut self) -> Result<VirtioSlot, DeviceError> {
        let (device, slot, transport) = self.add_virtio("the entropy device", |interrupt| {
            Rng::new(interrupt).map_err(|source| DeviceError::EventFd {
                what: "the entropy device".into(),
                source,
            })
        })?;
        let metrics = device.lock().unwrap_or_else(|p| p.into_inner()).metrics();
        self.virtio.push(VirtioEntry {
            slot,
            transport,
            device: AttachedDevice::Rng { device, metrics },
        });
        Ok(slot)
    }

    /// Every device's counters: kind (`serial`, `block`, `rng`, ...), id, counters.
    pub fn counters(&self) -> Vec<DeviceCounters> {
        let mut all: Vec<DeviceCounters> = Vec::new();
        if let Some(serial) = &self.serial {
            let metrics = serial.lock().unwrap_or_else(|p| p.into_inner()).metrics();
            all.push(("serial", None, metrics));
        }
        for e in &self.virtio {
            all.push(match &e.device {
                AttachedDevice::Block { id, metrics, .. } => {
                    ("block", Some(id.clone()), metrics.clone())
                }
                AttachedDevice::Net { id, metrics, .. } => {
                    ("net", Some(id.clone()), metrics.clone())
                }
                AttachedDevice::Vsock { metrics, .. } => ("vsock", None, metrics.clone()),
                AttachedDevice::Rng { metrics, .. } => ("rng", None, metrics.clone()),
            });
        }
        all
    }

    /// The virtio devices, in slot order.
    pub fn virtio_devices(&self) -> &[VirtioEntry] {
        &self.virtio
    }

    /// The command-line entries announcing every virtio device.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.virtio.iter().map(|e| e.slot.cmdline_entry()).collect()
    }

    /// Devices that work on the VM's event loop.
    pub fn event_subscribers(&self) -> &[Arc<Mutex<dyn MutEventSubscriber + Send>>] {
        &self.subscribers
    }

    /// The buses, for the vCPUs.
    pub fn buses(&self) -> &IoBuses {
        &self.buses
    }

    /// COM1, once added.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    /// The keyboard controller.
    pub fn i8042(&self) -> &Arc<Mutex<I8042>> {
        &self.i8042
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        self.i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send_ctrl_alt_del()
    }

    /// Signalled when the guest pulses the i8042 reset line.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    /// The reset line for a vCPU: the controller's ports and a handle on its reset eventfd.
    pub fn reset_line(&self) -> std::io::Result<crate::vcpu::ResetLine> {
        let start = u16::try_from(I8042_PORT).unwrap_or(u16::MAX);
        let len = u16::try_from(I8042_PORT_LEN).unwrap_or(0);
        Ok(crate::vcpu::ResetLine {
            ports: start..start.saturating_add(len),
            evt: self.reset_evt.try_clone()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_announce_themselves_like_microvm() {
        let slot = VirtioSlot {
            base: 0xd000_1000,
            irq: 6,
        };
        assert_eq!(slot.cmdline_entry(), "virtio_mmio.device=4K@0xd0001000:6");
    }

    #[test]
    fn disk_replication_reaches_every_drive_by_id() {
        use std::os::unix::fs::FileExt;

        use lockstep_devices::virtio::block::CacheType;
        use vm_memory::GuestAddress;

        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no /dev/kvm");
            return;
        }
        let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut devices = DeviceManager::new(Arc::new(vm), mem).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (id, read_only) in [("root", false), ("data", true)] {
            let path = dir.path().join(id);
            let bytes: Vec<u8> = (0..3 * 4096 + 512).map(|i| (i % 249) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            let config = BlockConfig {
                drive_id: id.into(),
                path,
                read_only,
                cache: CacheType::Unsafe,
            };
            devices.add_block(&config, "drives[0]").unwrap();
        }
        devices.track_disk_writes(true);
        assert_eq!(
            devices.take_written_blocks(),
            vec![("root".to_string(), vec![]), ("data".to_string(), vec![])]
        );

        std::fs::File::options()
            .write(true)
            .open(dir.path().join("root"))
            .unwrap()
            .write_all_at(&[0xab; 100], 3 * 4096)
            .unwrap();
        let mut out = EpochBlocks::new();
        devices.read_disk_blocks("root", &[2, 3], &mut out).unwrap();
        let blocks: Vec<(u64, usize)> = out.iter().map(|(b, d)| (b, d.len())).collect();
        assert_eq!(blocks, vec![(2, 4096), (3, 512)]);
        assert_eq!(&out.iter().nth(1).unwrap().1[..100], &[0xab; 100]);

        let err = devices
            .read_disk_blocks("nope", &[0], &mut out)
            .unwrap_err();
        assert!(matches!(err, DeviceError::NoDrive(_)), "{err}");
        let err = devices
            .read_disk_blocks("data", &[4], &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("drive data: block 4"), "{err}");
        devices.track_disk_writes(false);
    }
}
