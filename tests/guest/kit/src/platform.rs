//! What the VMM's firmware tables describe: the CPUs (by local APIC ID), the IOAPIC and how ISA IRQs 1
//! (the i8042 keyboard) and 4 (COM1) reach it. Found in the ACPI MADT when there is an RSDP, else in
//! the MP table.

use crate::boot::BootInfo;
use crate::cpu::MAX_CPUS;
use crate::{acpi, mptable};

/// Where the CPU list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuSource {
    /// The ACPI MADT.
    Madt,
    /// The Intel MultiProcessor Specification table.
    MpTable,
    /// Neither table was found: the BSP alone is assumed.
    None,
}

impl CpuSource {
    /// The name used in the report (`LKS cpus=<n> source=<name>`).
    pub fn name(self) -> &'static str {
        match self {
            CpuSource::Madt => "madt",
            CpuSource::MpTable => "mptable",
            CpuSource::None => "none",
        }
    }
}

/// How an ISA IRQ is wired to the IOAPIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsaRoute {
    /// IOAPIC input (global system interrupt).
    pub gsi: u32,
    /// Level-triggered (ISA default: edge).
    pub level: bool,
    /// Active low (ISA default: active high).
    pub active_low: bool,
}

impl IsaRoute {
    /// The ISA default: the same pin, edge-triggered, active high.
    pub fn identity(irq: u8) -> Self {
        IsaRoute::edge(u32::from(irq))
    }

    /// Global system interrupt `gsi` with the ISA defaults: edge-triggered, active high.
    pub fn edge(gsi: u32) -> Self {
        IsaRoute {
            gsi,
            level: false,
            active_low: false,
        }
    }

    /// Applies MPS INTI flags (polarity in bits 0-1, trigger in bits 2-3; 0 = bus default).
    pub fn with_inti_flags(mut self, flags: u16) -> Self {
        match flags & 3 {
            1 => self.active_low = false,
            3 => self.active_low = true,
            _ => {}
        }
        match (flags >> 2) & 3 {
            1 => self.level = false,
            3 => self.level = true,
            _ => {}
        }
        self
    }
}

/// Most IOAPICs kept.
pub const MAX_IOAPICS: usize = 4;

/// One IOAPIC: where its registers are and which global system interrupts its pins carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoApicInfo {
    /// MMIO base.
    pub base: u64,
    /// GSI of pin 0.
    pub gsi_base: u32,
    /// Number of pins.
    pub pins: u32,
}

/// The machine as the firmware tables describe it.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    apic_ids: [u32; MAX_CPUS],
    cpus: usize,
    ioapics: [IoApicInfo; MAX_IOAPICS],
    ioapic_count: usize,
    /// Which table described the CPUs.
    pub source: CpuSource,
    /// How COM1's IRQ 4 reaches the IOAPIC.
    pub serial_route: IsaRoute,
    /// How the keyboard's IRQ 1 reaches the IOAPIC.
    pub keyboard_route: IsaRoute,
}

/// ISA IRQ of the i8042 keyboard.
pub const KEYBOARD_ISA_IRQ: u8 = 1;
/// ISA IRQ of COM1.
pub const SERIAL_ISA_IRQ: u8 = 4;

impl Platform {
    /// An empty description for a table parser to fill.
    pub fn new(source: CpuSource) -> Self {
        Platform {
            apic_ids: [0; MAX_CPUS],
            cpus: 0,
            ioapics: [IoApicInfo::default(); MAX_IOAPICS],
            ioapic_count: 0,
            source,
            serial_route: IsaRoute::identity(SERIAL_ISA_IRQ),
            keyboard_route: IsaRoute::identity(KEYBOARD_ISA_IRQ),
        }
    }

    /// Records a table's interrupt source override (MPS INTI `flags`) for ISA IRQ `irq`; only the
    /// IRQs the kit uses (the keyboard's and COM1's) are kept.
    pub fn override_isa(&mut self, irq: u8, gsi: u32, flags: u16) {
        let route = IsaRoute {
            gsi,
            ..IsaRoute::identity(irq)
        }
        .with_inti_flags(flags);
        match irq {
            KEYBOARD_ISA_IRQ => self.keyboard_route = route,
            SERIAL_ISA_IRQ => self.serial_route = route,
            _ => {}
        }
    }

    /// Finds the tables and reads them: MADT if an RSDP is found, else the MP table, else BSP only.
    pub fn discover(boot: &BootInfo) -> Self {
        if let Some(platform) = acpi::find_rsdp(boot.rsdp_hint).and_then(acpi::read_madt) {
            return platform;
        }
        if let Some(platform) = mptable::find().and_then(mptable::read) {
            return platform;
        }
        let mut platform = Platform::new(CpuSource::None);
        platform.add_cpu(crate::apic::local_apic_id());
        platform
    }

    /// Records an enabled CPU. CPUs past [`MAX_CPUS`] are counted but not started.
    pub fn add_cpu(&mut self, apic_id: u32) {
        if self.cpus < MAX_CPUS {
            self.apic_ids[self.cpus] = apic_id;
        }
        self.cpus += 1;
    }

    /// Records an IOAPIC. The MADT gives its first GSI; the MP table does not, and then its pins
    /// follow the previous IOAPIC's, as Linux numbers them.
    pub fn add_ioapic(&mut self, base: u64, gsi_base: Option<u32>) {
        if self.ioapic_count == MAX_IOAPICS {
            return;
        }
        let pins = crate::apic::IoApic::new(base).pins();
        let gsi_base = gsi_base.unwrap_or_else(|| {
            self.ioapics()
                .iter()
                .map(|i| i.gsi_base + i.pins)
                .max()
                .unwrap_or(0)
        });
        self.ioapics[self.ioapic_count] = IoApicInfo {
            base,
            gsi_base,
            pins,
        };
        self.ioapic_count += 1;
    }

    /// The IOAPICs, in table order.
    pub fn ioapics(&self) -> &[IoApicInfo] {
        &self.ioapics[..self.ioapic_count]
    }

    /// Routes global system interrupt `route.gsi` to `vector` on the CPU with APIC ID
    /// `destination`, through whichever IOAPIC carries it; false if none does.
    pub fn route(&self, route: IsaRoute, vector: u8, destination: u32) -> bool {
        let Some(ioapic) = self
            .ioapics()
            .iter()
            .find(|i| (i.gsi_base..i.gsi_base + i.pins).contains(&route.gsi))
        else {
            return false;
        };
        crate::apic::IoApic::new(ioapic.base).route(
            route.gsi - ioapic.gsi_base,
            route,
            vector,
            destination,
        );
        true
    }

    /// Number of enabled CPUs the table lists.
    pub fn cpu_count(&self) -> usize {
        self.cpus
    }

    /// Local APIC IDs of the CPUs that can be started (at most [`MAX_CPUS`]).
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.cpus.min(MAX_CPUS)]
    }
}
