//! Interrupt controllers: the local APIC (xAPIC MMIO at its default base), the IOAPIC, and masking
//! the legacy 8259 PICs so that only the IOAPIC delivers device interrupts.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::io::outb;
use crate::phys::{mmio_read32, mmio_write32};
use crate::platform::IsaRoute;

/// Default physical base of the local APIC, which every VMM uses.
pub const LAPIC_BASE: u64 = 0xfee0_0000;

const LAPIC_ID: u64 = 0x20;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
const TIMER_DIVIDE_BY_16: u32 = 0x3;

const IOAPIC_REGSEL: u64 = 0x00;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_VERSION: u32 = 0x01;
const IOAPIC_REDIRECTION: u32 = 0x10;
const REDIRECTION_ACTIVE_LOW: u32 = 1 << 13;
const REDIRECTION_LEVEL: u32 = 1 << 15;

/// This CPU's local APIC ID.
pub fn local_apic_id() -> u32 {
    mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24
}

/// Software-enables this CPU's local APIC with the given spurious vector and masks LINT0, where a
/// VMM may have wired the 8259 as ExtINT.
pub fn enable_local_apic(spurious_vector: u8) {
    mmio_write32(LAPIC_BASE + LAPIC_LVT_LINT0, LVT_MASKED);
    mmio_write32(
        LAPIC_BASE + LAPIC_SVR,
        SVR_ENABLE | u32::from(spurious_vector),
    );
}

/// The vector the BSP's local APIC timer was set up with (0: not yet).
static TIMER_VECTOR: AtomicU32 = AtomicU32::new(0);

/// Arms the BSP's local APIC timer once: `vector` fires after `ticks` times 16 bus cycles (under
/// KVM a bus cycle is 1 ns unless the VMM changed it). A wake-up for bounded waits in `hlt`; the
/// divider and vector are written only when they change (each register write is an exit).
pub fn arm_oneshot_timer(vector: u8, ticks: u32) {
    if TIMER_VECTOR.swap(u32::from(vector), Ordering::Relaxed) != u32::from(vector) {
        mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
        mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, u32::from(vector));
    }
    mmio_write32(LAPIC_BASE + LAPIC_TIMER_INITIAL, ticks);
}

/// Signals end of interrupt to this CPU's local APIC.
pub fn end_of_interrupt() {
    mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

fn send_ipi(apic_id: u32, command: u32) {
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HIGH, apic_id << 24);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LOW, command);
    // Bounded: a VMM's APIC delivers at once; a stuck bit must not hang the guest.
    for _ in 0..1000 {
        if mmio_read32(LAPIC_BASE + LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Sends INIT (level assert) to the CPU with this APIC ID.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, ICR_INIT_ASSERT);
}

/// Sends a start-up IPI: the CPU starts in real mode at `page * 4096`.
pub fn send_startup(apic_id: u32, page: u8) {
    send_ipi(apic_id, ICR_STARTUP | u32::from(page));
}

/// Masks every input of both 8259 PICs (OCW1), so they never interrupt.
pub fn mask_legacy_pics() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// An IOAPIC at an MMIO base.
pub struct IoApic {
    base: u64,
}

impl IoApic {
    /// The IOAPIC whose registers are at `base`.
    pub fn new(base: u64) -> Self {
        IoApic { base }
    }

    fn write(&self, register: u32, value: u32) {
        mmio_write32(self.base + IOAPIC_REGSEL, register);
        mmio_write32(self.base + IOAPIC_WINDOW, value);
    }

    /// Number of input pins (redirection entries), from the version register.
    pub fn pins(&self) -> u32 {
        mmio_write32(self.base + IOAPIC_REGSEL, IOAPIC_VERSION);
        ((mmio_read32(self.base + IOAPIC_WINDOW) >> 16) & 0xff) + 1
    }

    /// Routes input `pin` to `vector` on the CPU with APIC ID `destination` (fixed delivery,
    /// physical destination), with the trigger and polarity of `route`, and unmasks it.
    pub fn route(&self, pin: u32, route: IsaRoute, vector: u8, destination: u32) {
        let mut low = u32::from(vector);
        if route.active_low {
            low |= REDIRECTION_ACTIVE_LOW;
        }
        if route.level {
            low |= REDIRECTION_LEVEL;
        }
        let register = IOAPIC_REDIRECTION + 2 * pin;
        self.write(register + 1, destination << 24);
        self.write(register, low);
    }
}
