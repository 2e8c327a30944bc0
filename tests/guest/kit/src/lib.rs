//! The lockstep test-guest kit: the guest-side pieces of small freestanding programs that boot on
//! lockstep (or any VMM) through the Linux 64-bit boot protocol, PVH or a bzImage.
//!
//! A short, scalar CPL0 start-up (`boot/entry.s`) loads prebuilt tables and drops to CPL3, where all
//! Rust code runs: on a PVM host CPL0 is emulated instruction by instruction, CPL3 runs natively.
//! CPL3 reaches CPL0 only through the int3 service gate and exceptions (see [`cpu`]).
//!
//! A program declares its main with [`program!`] and receives the [`System`] the kit set up. The
//! [`keyboard`] turns a VMM's Ctrl-Alt-Del into a shutdown in every mode; [`kvmclock`] reads the
//! KVM clock. Devices
//! the command line announces (`virtio_mmio.device=`) are driven by [`virtio`], with a small network
//! stack in [`net`], and exercised by the monitor's commands in [`workload`].

#![no_std]

pub mod acpi;
pub mod apic;
pub mod boot;
pub mod cpu;
pub mod frames;
pub mod io;
pub mod keyboard;
pub mod kvmclock;
mod mem;
pub mod monitor;
pub mod mptable;
pub mod net;
pub mod phys;
pub mod platform;
pub mod report;
pub mod reset;
pub mod serial;
pub mod smp;
mod start;
pub mod time;
pub mod virtio;
pub mod workload;

pub use start::{System, SERIAL_VECTOR};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    report::fault_line(format_args!("panic {info}"));
    reset::reset()
}

/// Referenced by the prebuilt `core` library's unwind tables, which survive into unoptimized builds;
/// never called, because panics abort.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
