//! The standard test guest: reports what the VMM gave it on COM1, starts the APs, brings up the
//! virtio devices the command line announces, runs the `lks.run` script if there is one, then does
//! what `lks.mode` asks (report and reset, run and reset, interactive monitor, or halt). In every
//! mode but `report`, Ctrl-Alt-Del on the keyboard shuts it down (see `lks_kit::keyboard`).

#![no_std]
#![no_main]

use lks_kit::workload::Machine;
use lks_kit::{keyboard, monitor, report, reset, smp, System};

lks_kit::program!(main);

/// What the command line asks for.
struct Options<'a> {
    mode: Mode,
    start_aps: bool,
    script: Option<&'a [u8]>,
}

enum Mode {
    /// Report, then reset (the VMM exits).
    Report,
    /// Report, run the script, `LKS run done`, then reset.
    Run,
    /// Report, then the interactive monitor.
    Monitor,
    /// Report, then halt for ever with interrupts on (waking only for the keyboard).
    Halt,
}

impl<'a> Options<'a> {
    fn from_cmdline(system: &'a System) -> Self {
        let mut options = Options {
            mode: Mode::Monitor,
            start_aps: true,
            script: None,
        };
        for (key, value) in system.boot.cmdline_options() {
            match (key, value) {
                (b"lks.mode", b"report") => options.mode = Mode::Report,
                (b"lks.mode", b"run") => options.mode = Mode::Run,
                (b"lks.mode", b"monitor") => options.mode = Mode::Monitor,
                (b"lks.mode", b"halt") => options.mode = Mode::Halt,
                (b"lks.smp", b"0") => options.start_aps = false,
                (b"lks.smp", b"1") => options.start_aps = true,
                (b"lks.run", script) => options.script = Some(script),
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
    let mut machine = Machine::new(system);
    machine.devices.report();
    if let Some(script) = options.script {
        monitor::run_script(&mut machine, script);
    }
    match options.mode {
        Mode::Report => {
            report::line(format_args!("reset"));
            reset::reset()
        }
        Mode::Run => {
            report::line(format_args!("run done"));
            report::line(format_args!("reset"));
            reset::reset()
        }
        Mode::Monitor => monitor::run(&mut machine),
        Mode::Halt => {
            report::line(format_args!("halt"));
            keyboard::idle_forever()
        }
    }
}
