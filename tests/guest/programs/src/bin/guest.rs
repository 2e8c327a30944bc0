//! The standard test guest: reports what the VMM gave it on COM1, starts the APs, then does what the
//! command line's `lks.mode` asks (report and reset, interactive monitor, or halt).

#![no_std]
#![no_main]

use lks_kit::{cpu, monitor, report, reset, smp, System};

lks_kit::program!(main);

/// What the command line asks for.
struct Options {
    mode: Mode,
    start_aps: bool,
}

enum Mode {
    /// Report, then reset (the VMM exits).
    Report,
    /// Report, then the interactive monitor.
    Monitor,
    /// Report, then halt for ever with interrupts on.
    Halt,
}

impl Options {
    fn from_cmdline(system: &System) -> Self {
        let mut options = Options {
            mode: Mode::Monitor,
            start_aps: true,
        };
        for (key, value) in system.boot.cmdline_options() {
            match (key, value) {
                (b"lks.mode", b"report") => options.mode = Mode::Report,
                (b"lks.mode", b"monitor") => options.mode = Mode::Monitor,
                (b"lks.mode", b"halt") => options.mode = Mode::Halt,
                (b"lks.smp", b"0") => options.start_aps = false,
                (b"lks.smp", b"1") => options.start_aps = true,
                _ => {}
            }
        }
        options
    }
}

fn main(system: &System) -> ! {
    let options = Options::from_cmdline(system);
    report::boot_report(system);
    report::line(format_args!("ready"));
    let online = if options.start_aps {
        smp::start_aps(&system.boot, &system.platform)
    } else {
        smp::online()
    };
    report::line(format_args!("cpus_online={online}"));
    match options.mode {
        Mode::Report => {
            report::line(format_args!("reset"));
            reset::reset()
        }
        Mode::Monitor => monitor::run(system),
        Mode::Halt => {
            report::line(format_args!("halt"));
            cpu::halt_forever()
        }
    }
}
