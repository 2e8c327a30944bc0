//! lockstep's seccomp filters, as Firecracker has them: one allow list per kind of thread
//! (vCPU, a VM's owner thread, the control API, Firecracker's API, the CIM endpoint, indication
//! delivery, the main thread), built with rust-vmm's `seccompiler` and installed by each thread
//! itself before it does its work (a vCPU thread before its first `KVM_RUN`, an owner thread
//! before its device loop).
//!
//! The binary chooses the [`Mode`] once with [`configure`] before it starts any thread; a
//! library user that never calls it (unit tests) gets no filters. Enforced, a forbidden system
//! call ends the whole process: the kernel sends SIGSYS, whose handler writes one line on
//! stderr naming the call, the thread and its kind, then exits with
//! [`EXIT_SECCOMP_VIOLATION`].
//!
//! Self-test: with `LOCKSTEP_SECCOMP_SELFTEST=<kind>` in its environment (a name from
//! [`ThreadKind::name`]), the first thread of that kind makes a forbidden call (`personality`,
//! a harmless query) right after installing its filter, to show that a violation ends the
//! process; with the filters off the call just fails and the process carries on.

use std::cell::Cell;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction};

mod lists;
mod sigsys;

/// The exit code of a process that made a forbidden system call (128 + SIGSYS, as a shell
/// reports a process killed by SIGSYS).
pub const EXIT_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

/// The environment variable that names the thread kind of the self-test.
pub const SELFTEST_ENV: &str = "LOCKSTEP_SECCOMP_SELFTEST";

/// How the filters act, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A forbidden call ends the process (the default of the `lockstep` command).
    Enforce,
    /// A forbidden call is allowed and the kernel logs it (`audit: type=1326` in the kernel log):
    /// for finding what a new code path needs.
    Log,
    /// No filters.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" | "enforce" => Ok(Mode::Enforce),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!("{other:?}: expected on, log or off")),
        }
    }
}

/// What a thread does, which decides its allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The process's main thread once everything is started, and the signal watcher.
    Main = 1,
    /// The control API's server thread and its blocking pool.
    Api,
    /// A Firecracker API server thread (and its blocking pool, and the threads it starts).
    FirecrackerApi,
    /// The CIM endpoint's runtime threads and its job threads.
    Cim,
    /// The CIM indication thread and its delivery workers.
    Indications,
    /// A VM's owner thread: its device loop and the commands it takes.
    VmOwner,
    /// A vCPU thread.
    Vcpu,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Api,
        ThreadKind::FirecrackerApi,
        ThreadKind::Cim,
        ThreadKind::Indications,
        ThreadKind::VmOwner,
        ThreadKind::Vcpu,
    ];

    /// The kind's name in messages and in [`SELFTEST_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Api => "api",
            ThreadKind::FirecrackerApi => "firecracker-api",
            ThreadKind::Cim => "cim",
            ThreadKind::Indications => "indications",
            ThreadKind::VmOwner => "vm-owner",
            ThreadKind::Vcpu => "vcpu",
        }
    }

    fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn from_u8(value: u8) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| *k as u8 == value)
    }
}

/// Why the filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// [`configure`] was called twice.
    #[error("the seccomp mode is already set")]
    AlreadyConfigured,
    /// A filter could not be built (a bug in the lists).
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::BackendError,
    },
    /// A filter could not be compiled to BPF.
    #[error("cannot compile the {kind} seccomp filter: {source}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// The self-test variable names no thread kind.
    #[error("{SELFTEST_ENV}={0:?} names no thread kind (main, api, firecracker-api, cim, indications, vm-owner or vcpu)")]
    SelfTest(String),
}

/// The process's choice, made once.
struct Settings {
    mode: Mode,
    /// One program per kind, in [`ThreadKind::ALL`] order (empty when off).
    programs: Vec<BpfProgram>,
    selftest: Option<ThreadKind>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static SELFTEST_DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread's kind (0: none yet) and name, for the SIGSYS handler, which cannot allocate.
    static IDENTITY: Cell<(u8, [u8; 16])> = const { Cell::new((0, [0; 16])) };
}

/// Sets the mode for the whole process and builds every filter; call it once, before any thread
/// that installs a filter starts. Reads [`SELFTEST_ENV`].
pub fn configure(mode: Mode) -> Result<(), SeccompError> {
    let selftest = match std::env::var(SELFTEST_ENV) {
        Ok(name) => Some(ThreadKind::from_name(&name).ok_or(SeccompError::SelfTest(name))?),
        Err(_) => None,
    };
    let mismatch = match mode {
        Mode::Enforce => Some(SeccompAction::Trap),
        Mode::Log => Some(SeccompAction::Log),
        Mode::Off => None,
    };
    let programs = match mismatch {
        None => Vec::new(),
        Some(action) => {
            if mode == Mode::Enforce {
                sigsys::install_handler().map_err(SeccompError::Handler)?;
            }
            let pid = std::process::id();
            ThreadKind::ALL
                .into_iter()
                .map(|kind| {
                    let filter = lists::filter(kind, action.clone(), pid)?;
                    filter.try_into().map_err(|source| SeccompError::Compile {
                        kind: kind.name(),
                        source,
                    })
                })
                .collect::<Result<Vec<BpfProgram>, _>>()?
        }
    };
    SETTINGS
        .set(Settings {
            mode,
            programs,
            selftest,
        })
        .map_err(|_| SeccompError::AlreadyConfigured)
}

/// The process's mode ([`Mode::Off`] until [`configure`] is called).
pub fn mode() -> Mode {
    SETTINGS.get().map_or(Mode::Off, |s| s.mode)
}

/// Installs the filter of `kind` on the calling thread (nothing when the filters are off). The
/// thread's later children inherit it. Fails closed: a thread that cannot install its filter
/// ends the process rather than run without it.
pub fn install(kind: ThreadKind) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, the size of `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    IDENTITY.with(|id| id.set((kind as u8, name)));
    let Some(settings) = SETTINGS.get() else {
        return;
    };
    if let Some(program) = settings.programs.get(kind as usize - 1) {
        if let Err(e) = seccompiler::apply_filter(program) {
            eprintln!(
                "lockstep: seccomp: cannot install the {} filter on thread {:?}: {e}",
                kind.name(),
                thread_name(&name)
            );
            // SAFETY: ends the process at once; nothing of this thread is used after.
            unsafe { libc::_exit(EXIT_SECCOMP_VIOLATION) };
        }
    }
    if settings.selftest == Some(kind) && !SELFTEST_DONE.swap(true, Ordering::SeqCst) {
        selftest(kind, settings.mode);
    }
}

/// Makes a call no filter allows: with the filters enforced, the process ends here.
fn selftest(kind: ThreadKind, mode: Mode) {
    log::warn!(
        "seccomp self-test ({SELFTEST_ENV}): a {} thread makes a forbidden system call (personality)",
        kind.name()
    );
    // SAFETY: personality(0xffffffff) only reads the current persona.
    let result = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
    log::warn!("seccomp self-test: personality returned {result}; the filters are {mode:?}");
}

fn thread_name(name: &[u8; 16]) -> &str {
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    std::str::from_utf8(&name[..end]).unwrap_or("?")
}

/// This thread's kind and name, as [`install`] recorded them.
fn identity() -> (Option<ThreadKind>, [u8; 16]) {
    let (kind, name) = IDENTITY.with(|id| id.get());
    (ThreadKind::from_u8(kind), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(Mode::Enforce));
        assert_eq!("off".parse(), Ok(Mode::Off));
        assert_eq!("log".parse(), Ok(Mode::Log));
        assert!("maybe".parse::<Mode>().is_err());
    }

    #[test]
    fn kinds_round_trip() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
            assert_eq!(ThreadKind::from_u8(kind as u8), Some(kind));
            assert_eq!(ThreadKind::ALL[kind as usize - 1], kind);
        }
    }

    #[test]
    fn unconfigured_means_off() {
        // Unit tests never configure: installing is a no-op that records the identity.
        std::thread::spawn(|| {
            install(ThreadKind::Vcpu);
            assert_eq!(identity().0, Some(ThreadKind::Vcpu));
            assert_eq!(mode(), Mode::Off);
        })
        .join()
        .unwrap();
    }
}
