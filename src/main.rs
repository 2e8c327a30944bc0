//! The `lockstep` command: runs a microVM in the foreground from a JSON config, or a whole host.
//!
//! Exit codes: 0 when the guest stopped itself (reset or power-off) or the console escape ended
//! it; 1 on a VMM or host error; 2 on a bad command line or config; 128 + N when signal N
//! stopped it; 159 (128 + SIGSYS) when a thread made a system call its seccomp filter forbids.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

mod host_mode;
mod privileges;
mod takeover;

use clap::{Parser, Subcommand};
use lockstep_api::VmConfig;
use lockstep_seccomp::Mode as SeccompMode;
use lockstep_vmm::console::{self, EscapedInput, RawTerminal};
use lockstep_vmm::event_loop::termination_signalfd;
use lockstep_vmm::exit::ExitSignal;
use lockstep_vmm::vm::RunOptions;
use lockstep_vmm::{ConsoleInput, ExitReason, Hypervisor, KvmBackend, Vm};

/// Info from lockstep; nothing from virtio-queue, whose messages a guest can provoke at will
/// (lockstep reports broken queues itself).
const DEFAULT_LOG_FILTER: &str = "info,virtio_queue=off";
pub(crate) const EXIT_VMM_ERROR: u8 = 1;
pub(crate) const EXIT_CONFIG_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "A lightweight ESXi-style virtual machine monitor on KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM from a JSON config and attach its serial console to this terminal
    /// (Ctrl-A x ends it). With --api-sock, serve Firecracker's API for it (and wait for its
    /// configuration there when no config file is given).
    Run {
        /// The VM config (Firecracker's keys: boot-source, machine-config, ...).
        config: Option<PathBuf>,
        /// Serve Firecracker's API on this Unix socket.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// The VM's name behind --api-sock.
        #[arg(long, default_value = "vm")]
        id: String,
        #[command(flatten)]
        seccomp: SeccompArgs,
    },
    /// Run as a host: many VMs, managed through the control API (and CIM).
    Host {
        /// The host config (api_socket, state_dir, vms, ...).
        #[arg(long)]
        config: PathBuf,
        /// Give up root for this user (a name or a number) once /dev/kvm, the control API's
        /// sockets and the state folder (chowned to the user) are open; everything else (disk
        /// images, kernels, taps, snapshots, the CIM port and certificate) is then opened as
        /// that user.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Take every VM of the host listening on this takeover socket (its
        /// `<state_dir>/takeover.sock`) into this process, then serve the control API in its
        /// place: the old process exits 0 once its VMs have moved.
        #[arg(long, value_name = "SOCKET")]
        takeover: Option<PathBuf>,
        #[command(flatten)]
        seccomp: SeccompArgs,
    },
    /// Print which KVM backend this host has: vmx, svm, pvm or unknown.
    Backend,
    /// Hash a password (read from stdin) for the host config's CIM users.
    HashPassword,
}

/// The seccomp switch of `run` and `host`.
#[derive(clap::Args)]
struct SeccompArgs {
    /// Seccomp filters on every thread: on (a forbidden system call ends the process with exit
    /// code 159 and a line naming it), log (the kernel logs it, nothing is stopped) or off.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    seccomp: SeccompMode,
    /// No seccomp filters: the same as --seccomp=off (Firecracker's flag).
    #[arg(long, conflicts_with = "seccomp")]
    no_seccomp: bool,
}

impl SeccompArgs {
    /// Sets the filters' mode for the process; before any thread starts.
    fn configure(&self) -> Result<(), ExitCode> {
        let mode = if self.no_seccomp {
            SeccompMode::Off
        } else {
            self.seccomp
        };
        if mode != SeccompMode::Enforce {
            log::warn!("seccomp filters: {mode:?}");
        }
        lockstep_seccomp::configure(mode).map_err(|e| fail(EXIT_CONFIG_ERROR, &e.to_string()))
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let seccomp = match &cli.command {
        Command::Run { seccomp, .. } | Command::Host { seccomp, .. } => Some(seccomp),
        Command::Backend | Command::HashPassword => None,
    };
    if let Some(Err(code)) = seccomp.map(SeccompArgs::configure) {
        return code;
    }
    match cli.command {
        Command::Run {
            config,
            api_sock: None,
            ..
        } => match config {
            Some(config) => run(&config),
            None => fail(
                EXIT_CONFIG_ERROR,
                "run needs a config file, or --api-sock to be configured through the API",
            ),
        },
        Command::Run {
            config,
            api_sock: Some(sock),
            id,
            ..
        } => {
            let config = match config
                .map(|p| VmConfig::from_file(&p).map_err(|e| format!("{}: {e}", p.display())))
                .transpose()
            {
                Ok(c) => c,
                Err(e) => return fail(EXIT_CONFIG_ERROR, &e),
            };
            host_mode::firecracker(&sock, &id, config)
        }
        Command::Host {
            config,
            user,
            takeover,
            ..
        } => host_mode::host(&config, user.as_deref(), takeover.as_deref()),
        Command::HashPassword => {
            let mut password = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut password) {
                return fail(EXIT_VMM_ERROR, &format!("reading the password: {e}"));
            }
            match lockstep_cim::hash_password(password.trim_end_matches(['\r', '\n'])) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_VMM_ERROR, &e),
            }
        }
        Command::Backend => {
            let backend = KvmBackend::detect();
            println!("{}", backend.short_name());
            log::info!("{backend}");
            ExitCode::SUCCESS
        }
    }
}

/// Logs go to stderr: `[lockstep LEVEL] message` for people, or with LOCKSTEP_LOG_FORMAT=json
/// one JSON object a line (`ts` in seconds since the epoch, `level`, `target`, `msg`) for log
/// collectors. LOCKSTEP_LOG filters, as RUST_LOG does.
fn init_logging() {
    let json = std::env::var("LOCKSTEP_LOG_FORMAT").is_ok_and(|f| f == "json");
    let mut builder = env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("LOCKSTEP_LOG", DEFAULT_LOG_FILTER),
    );
    if json {
        builder.format(|buf, record| {
            use std::io::Write;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let line = serde_json::json!({
                "ts": ts,
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    } else {
        builder.format(|buf, record| {
            use std::io::Write;
            // Live migration progress lines on the terminal make way for the log line.
            if let Some(clear) = lockstep_vmm::migration::clear_for_log_line() {
                buf.write_all(clear.as_bytes())?;
            }
            writeln!(buf, "[lockstep {}] {}", record.level(), record.args())
        });
    }
    builder.init();
}

fn run(config_path: &std::path::Path) -> ExitCode {
    let config = match VmConfig::from_file(config_path) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EXIT_CONFIG_ERROR,
                &format!("{}: {e}", config_path.display()),
            )
        }
    };
    let hv = match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => return fail(EXIT_VMM_ERROR, &e.to_string()),
    };
    log::info!("host KVM backend: {}", hv.backend());
    let vm = match Vm::create(&hv, &config) {
        Ok(vm) => vm,
        Err(e) if e.is_config_error() => {
            return fail(
                EXIT_CONFIG_ERROR,
                &format!("{}: {e}", config_path.display()),
            )
        }
        Err(e) => return fail(EXIT_VMM_ERROR, &e.to_string()),
    };
    if let Some(entry) = vm.boot_entry() {
        log::info!("{}: booting {entry:?}", vm.name());
    }

    // Block termination signals before any vCPU thread exists so that they all inherit the
    // mask and the signals arrive on the event loop instead.
    let signals = match termination_signalfd() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("cannot catch termination signals: {e}");
            None
        }
    };
    let (input, _raw_terminal) = match console_input(&config, vm.exit_signal()) {
        Ok(v) => v,
        Err(e) => return fail(EXIT_VMM_ERROR, &format!("console: {e}")),
    };
    match vm.run(RunOptions {
        input,
        signals,
        ..Default::default()
    }) {
        Ok(reason) => exit_code(&reason),
        Err(e) => fail(EXIT_VMM_ERROR, &e.to_string()),
    }
}

/// The console input for a VM whose serial goes to stdout: the raw terminal with the Ctrl-A x
/// escape when stdin is a terminal, or stdin as it is (a pipe, in tests) otherwise.
/// The console input, and the raw-mode guard that must live as long as the VM runs.
type Console = (Option<Box<dyn ConsoleInput>>, Option<RawTerminal>);

fn console_input(config: &VmConfig, exit: &Arc<ExitSignal>) -> std::io::Result<Console> {
    if config.serial.output_path.is_some() {
        return Ok((None, None));
    }
    // Read the descriptor directly: std's Stdin buffers, which would hide input from epoll.
    let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    if console::stdin_is_terminal() {
        let raw = RawTerminal::stdin()?;
        eprintln!("[lockstep] serial console attached; Ctrl-A x ends the VM");
        Ok((
            Some(Box::new(EscapedInput::new(stdin, exit.clone()))),
            Some(raw),
        ))
    } else {
        Ok((Some(Box::new(stdin)), None))
    }
}

fn exit_code(reason: &ExitReason) -> ExitCode {
    match reason {
        ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::TripleFault => {
            ExitCode::SUCCESS
        }
        ExitReason::Requested { signal: None } => ExitCode::SUCCESS,
        ExitReason::Requested { signal: Some(s) } => ExitCode::from(128u8.saturating_add(*s as u8)),
        ExitReason::VcpuError(msg) => fail(EXIT_VMM_ERROR, msg),
    }
}

pub(crate) fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("lockstep: error: {message}");
    ExitCode::from(code)
}
