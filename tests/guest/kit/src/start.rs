//! The first Rust code each CPU runs, at CPL3: the BSP finishes the machine set-up and calls the
//! program's main; an AP checks in and halts.

use crate::boot::{BootInfo, BootKind};
use crate::platform::Platform;
use crate::{apic, cpu, keyboard, serial, smp};

/// The machine as the program sees it after start-up.
pub struct System {
    /// What the VMM handed over.
    pub boot: BootInfo,
    /// What the firmware tables describe.
    pub platform: Platform,
    /// End of the identity map (at least 4 GiB).
    pub mapped_end: u64,
    /// Whether COM1's receive interrupt is routed through the IOAPIC (else input is polled).
    pub serial_irq: bool,
}

/// The vector COM1's interrupt arrives on.
pub const SERIAL_VECTOR: u8 = cpu::IRQ_BASE + crate::platform::SERIAL_ISA_IRQ;

extern "Rust" {
    /// The program's main, defined with [`crate::program!`].
    fn lks_program_main(system: &System) -> !;
}

/// BSP entry from `boot/entry.s`: EDI = boot kind, RSI = boot-info pointer; .bss is zeroed.
pub(crate) extern "C" fn bsp_main(kind: u32, info: u64) -> ! {
    cpu::install_handlers();
    serial::COM1.init();
    let Some(kind) = BootKind::from_entry(kind) else {
        crate::report::fault_line(format_args!("fault bad-boot-kind={kind}"));
        crate::reset::reset();
    };
    let boot = BootInfo::parse(kind, info);
    let mapped_end = cpu::paging::map_high_memory(&boot);
    let platform = Platform::discover(&boot);

    apic::mask_legacy_pics();
    apic::enable_local_apic(cpu::SPURIOUS_VECTOR);
    let serial_irq = platform.route(platform.serial_route, SERIAL_VECTOR, apic::local_apic_id());
    if serial_irq {
        serial::COM1.enable_rx_interrupt();
    }
    keyboard::init(&boot, &platform);
    crate::reset::init(&boot);

    let system = System {
        boot,
        platform,
        mapped_end,
        serial_irq,
    };
    // SAFETY: the program defines this function through `program!`, with exactly this signature.
    unsafe { lks_program_main(&system) }
}

/// AP entry from `boot/entry.s`: EDI = CPU index.
pub(crate) extern "C" fn ap_main(_index: u32) -> ! {
    smp::check_in();
    cpu::halt_forever()
}

/// Declares a program's main function: `lks_kit::program!(main);` with `fn main(&System) -> !`.
#[macro_export]
macro_rules! program {
    ($main:path) => {
        /// Called by the kit once the machine is set up.
        #[no_mangle]
        pub fn lks_program_main(system: &$crate::System) -> ! {
            $main(system)
        }
    };
}
