//! A small interactive monitor on the serial console: prompt `lks> `, typed characters echoed, one
//! command per line. While idle it sleeps in CPL0 until COM1's receive interrupt or the network
//! device's (or polls when the platform has no IOAPIC or `lks.virtio=poll`), and answers ARP and
//! pings meanwhile. The same commands run non-interactively from `lks.run="cmd;cmd;..."`. Waiting
//! for input, and between script commands, it looks for Ctrl-Alt-Del on the keyboard.

use crate::report::ConsoleGuard;
use crate::serial::COM1;
use crate::workload::{self, Args, Machine};
use crate::{cpu, keyboard, phys, report, smp};

const PROMPT: &[u8] = b"lks> ";
const LINE_MAX: usize = 256;
const BACKSPACE: u8 = 0x08;
const DELETE: u8 = 0x7f;

/// Runs the monitor for ever (until `reset`).
pub fn run(machine: &mut Machine) -> ! {
    let mut line = [0u8; LINE_MAX];
    loop {
        ConsoleGuard::lock().write_bytes(PROMPT);
        let len = read_line(machine, &mut line);
        execute(machine, &line[..len]);
    }
}

/// Runs the `;`-separated commands of a script (`lks.run`), each announced as `LKS run <command>`.
pub fn run_script(machine: &mut Machine, script: &[u8]) {
    for command in script.split(|b| *b == b';') {
        let command = command.trim_ascii();
        keyboard::check();
        if !command.is_empty() {
            report::line(format_args!("run {}", crate::boot::Printable(command)));
            execute(machine, command);
        }
    }
}

fn read_byte(machine: &mut Machine) -> u8 {
    loop {
        cpu::take_pending_irqs();
        keyboard::check();
        if let Some(byte) = COM1.try_read() {
            return byte;
        }
        machine.service_network();
        if machine.system.serial_irq && machine.ready_to_sleep() {
            keyboard::idle_wait();
        } else {
            core::hint::spin_loop();
        }
    }
}

/// Reads one line with echo and backspace; returns its length (CR or LF ends it).
fn read_line(machine: &mut Machine, line: &mut [u8; LINE_MAX]) -> usize {
    let mut len = 0;
    loop {
        let byte = read_byte(machine);
        let mut console = ConsoleGuard::lock();
        match byte {
            b'\r' | b'\n' => {
                console.write_bytes(b"\r\n");
                return len;
            }
            BACKSPACE | DELETE if len > 0 => {
                len -= 1;
                console.write_bytes(b"\x08 \x08");
            }
            0x20..=0x7e if len < LINE_MAX => {
                line[len] = byte;
                len += 1;
                console.write_bytes(&[byte]);
            }
            _ => {}
        }
    }
}

fn parse_number(text: &[u8]) -> Option<u64> {
    let text = core::str::from_utf8(text).ok()?;
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn execute(machine: &mut Machine, line: &[u8]) {
    let system = machine.system;
    let line = line.trim_ascii();
    let (command, argument) = match line.iter().position(|b| *b == b' ') {
        Some(space) => (&line[..space], line[space + 1..].trim_ascii()),
        None => (line, &[][..]),
    };
    match command {
        b"" => {}
        b"help" => {
            ConsoleGuard::lock().write(format_args!(
                "commands:\n  help          this list\n  info          print the boot report again\n  \
                 echo <text>   print <text>\n  cpus          CPUs listed and online\n  \
                 mem           memory map and usable bytes\n  peek <addr>   read the u64 at a physical address\n  \
                 fault <kind>  take an exception at CPL3: pf, gp, ud or de\n  \
                 reset         reset the machine (the VMM exits)\n{}",
                workload::HELP
            ));
        }
        b"info" => report::boot_report(system),
        b"echo" => {
            let mut console = ConsoleGuard::lock();
            console.write_bytes(argument);
            console.write_bytes(b"\r\n");
        }
        b"cpus" => ConsoleGuard::lock().write(format_args!(
            "cpus={} source={} online={}\n",
            system.platform.cpu_count(),
            system.platform.source.name(),
            smp::online()
        )),
        b"mem" => {
            let mut console = ConsoleGuard::lock();
            for region in system.boot.memory_map() {
                console.write(format_args!(
                    "{:#018x}-{:#018x} type {}\n",
                    region.start,
                    region.start + region.size,
                    region.kind
                ));
            }
            console.write(format_args!(
                "usable={} mapped_end={:#x}\n",
                system.boot.usable_bytes(),
                system.mapped_end
            ));
        }
        b"peek" => match parse_number(argument) {
            Some(addr)
                if addr
                    .checked_add(8)
                    .is_some_and(|end| end <= system.mapped_end) =>
            {
                ConsoleGuard::lock()
                    .write(format_args!("{addr:#x}: {:#018x}\n", phys::read_u64(addr)));
            }
            _ => ConsoleGuard::lock().write(format_args!(
                "usage: peek <addr below {:#x}>\n",
                system.mapped_end
            )),
        },
        b"fault" => match argument {
            b"pf" => cpu::fault::page_fault(),
            b"gp" => cpu::fault::general_protection(),
            b"ud" => cpu::fault::invalid_opcode(),
            b"de" => cpu::fault::divide_error(),
            _ => ConsoleGuard::lock().write(format_args!("usage: fault pf|gp|ud|de\n")),
        },
        b"reset" => {
            report::line(format_args!("reset"));
            crate::reset::reset();
        }
        // A guest crash as the VMM sees one: a triple fault, no reset request.
        b"crash" => {
            report::line(format_args!("crash triple-fault"));
            crate::cpu::triple_fault();
        }
        _ if workload::execute(machine, command, &mut Args::new(argument)) => {}
        _ => {
            let mut console = ConsoleGuard::lock();
            console.write(format_args!("unknown command: "));
            console.write_bytes(command);
            console.write(format_args!(" (try help)\n"));
        }
    }
}
