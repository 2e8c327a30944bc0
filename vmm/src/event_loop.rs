//! The VM's event loop (event-manager): console input, the i8042 reset line, termination
//! signals and vCPU exits all arrive here on the VM's owner thread.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, ExitSignal};

/// Turns the i8042 reset line and termination signals into an [`ExitReason`], and wakes the
/// loop when a vCPU records one.
pub struct ExitWatcher {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    signals: Option<OwnedFd>,
}

/// Signals that end a foreground VM cleanly (terminal restored, exit code 128 + signal).
pub const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the termination signals in the calling thread (and the threads it spawns afterwards)
/// and returns a signalfd that reports them instead.
pub fn termination_signalfd() -> std::io::Result<OwnedFd> {
    let set = signal_set(&TERMINATION_SIGNALS);
    // SAFETY: `set` is valid; blocking signals in this thread has no memory-safety effect.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: creates a new descriptor from a valid signal set.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ExitWatcher {
    /// Watches `reset_evt` and, if given, a signalfd from [`termination_signalfd`].
    pub fn new(exit: Arc<ExitSignal>, reset_evt: EventFd, signals: Option<OwnedFd>) -> Self {
        ExitWatcher {
            exit,
            reset_evt,
            signals,
        }
    }
}

/// Reads one signal from a signalfd (from [`termination_signalfd`]); None if none was pending.
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            log::error!("cannot watch vCPU exits: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.reset_evt, EventSet::IN)) {
            log::error!("cannot watch the i8042 reset line: {e}");
        }
        if let Some(fd) = &self.signals {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                log::error!("cannot watch termination signals: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit.eventfd().as_raw_fd() {
            // The reason is already recorded; the wake-up itself is the message.
            let _ = self.exit.eventfd().read();
        } else if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            log::info!("the guest requested a reset through the i8042");
            self.exit.signal(ExitReason::GuestReset);
        } else if let Some(fd) = &self.signals {
            if events.fd() == fd.as_raw_fd() {
                if let Some(signal) = read_signal(fd) {
                    log::info!("stopping the VM on signal {signal}");
                    self.exit.signal(ExitReason::Requested {
                        signal: Some(signal),
                    });
                }
            }
        }
    }
}
