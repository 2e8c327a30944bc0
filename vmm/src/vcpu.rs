//! vCPUs: each runs `KVM_RUN` on a thread of its own, routes port and MMIO exits to the device
//! buses, and reports why it stopped.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use lockstep_devices::bus::Bus;
use lockstep_seccomp::ThreadKind;
use thiserror::Error;
use vmm_sys_util::errno as vmmsys_errno;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitReason, ExitSignal};
use crate::x86_64::vcpu_state::VcpuState;

/// Why a vCPU could not be set up or started.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed during setup.
    #[error("vCPU {index}: KVM {what}: {source}")]
    Kvm {
        /// The vCPU.
        index: u32,
        /// The ioctl.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than were given.
    #[error("vCPU {index}: KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// The vCPU.
        index: u32,
        /// How many KVM took.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmmsys_errno::Error),
    /// The thread could not be spawned.
    #[error("cannot start the thread for vCPU {index}: {source}")]
    Spawn {
        /// The vCPU.
        index: u32,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// The port I/O and MMIO buses a vCPU's exits are routed to.
#[derive(Clone, Default)]
pub struct IoBuses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O outside RAM.
    pub mmio: Bus,
}

/// Counters of one vCPU, readable while it runs.
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Returns from KVM_RUN (every exit to the VMM).
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub pio_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Accesses no device claimed.
    pub unhandled_accesses: AtomicU64,
}

lockstep_devices::impl_counters!(VcpuMetrics {
    exits,
    pio_exits,
    mmio_exits,
    unhandled_accesses
});

/// A vCPU that has been configured and not yet started.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    buses: Arc<IoBuses>,
    /// The i8042's reset line, looked at after each write to the controller's ports.
    reset_line: ResetLine,
    metrics: Arc<VcpuMetrics>,
}

/// The i8042 reset line as a vCPU sees it: the vCPU that pulses it ends the VM on that very
/// exit, so the reset is the VM's exit reason even when the guest goes on to triple-fault (as
/// the test guest does if nothing happened) before the event loop is scheduled.
pub struct ResetLine {
    /// The ports of the controller.
    pub ports: std::ops::Range<u16>,
    /// Signalled by the controller's reset command.
    pub evt: vmm_sys_util::eventfd::EventFd,
}

impl Vcpu {
    /// Wraps a KVM vCPU.
    pub fn new(index: u32, fd: VcpuFd, buses: Arc<IoBuses>, reset_line: ResetLine) -> Self {
        Vcpu {
            index,
            fd,
            buses,
            reset_line,
            metrics: Arc::new(VcpuMetrics::default()),
        }
    }

    /// The KVM vCPU, for register setup before the first run.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's counters.
    pub fn metrics(&self) -> &Arc<VcpuMetrics> {
        &self.metrics
    }

    /// The vCPU's index (also its APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID and the boot MSRs.
    pub fn configure(&self, cpuid: &CpuId, msrs: &Msrs) -> Result<(), VcpuError> {
        self.set_cpuid(cpuid)?;
        let set = self.fd.set_msrs(msrs).map_err(self.kvm_err("set MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index: self.index,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        Ok(())
    }

    /// Gives the vCPU its CPUID.
    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(self.kvm_err("set CPUID"))
    }

    /// Starts the vCPU on a thread of its own. It runs until the guest stops, an error occurs, or
    /// the handle asks it to stop; the first of these to end the VM is recorded in `exit`. The
    /// handle can also pause it, read or replace its state, and resume it.
    pub fn start(
        self,
        exit: Arc<ExitSignal>,
        msr_list: Arc<Vec<u32>>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let (request_tx, request_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::channel();
        let index = self.index;
        let metrics = self.metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Before the first KVM_RUN: no guest instruction runs on an unfiltered thread.
                lockstep_seccomp::install(ThreadKind::Vcpu);
                let mut vcpu = self;
                let mut control = Control {
                    requests: request_rx,
                    replies: reply_tx,
                    msr_list,
                    paused,
                    paused_at: None,
                };
                if let Some(reason) = vcpu.run_loop(&mut control) {
                    exit.signal(reason);
                }
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            requests: request_tx,
            replies: reply_rx,
            thread: Some(thread),
            metrics,
        })
    }

    /// Runs the guest until it stops or is told to; returns why the VM should end, if it should.
    fn run_loop(&mut self, control: &mut Control) -> Option<ExitReason> {
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        KICK_TARGET.with(|t| t.set(immediate_exit));
        let mut first_entry = self.index == 0;
        let reason = loop {
            if !self.handle_requests(control) {
                break None;
            }
            if first_entry {
                // For the boot benchmark (LOCKSTEP_LOG=info,boot_timer=debug): when the guest starts.
                log::debug!(target: "boot_timer", "first vCPU entry at CLOCK_MONOTONIC {} ns", monotonic_ns());
                first_entry = false;
            }
            match self.run_once() {
                Ok(None) => {}
                Ok(Some(reason)) => break Some(reason),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    break Some(ExitReason::VcpuError(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.index
                    )))
                }
            }
        };
        KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
        reason
    }

    /// Serves the owner's requests: at once when running, blocking while paused. Returns false
    /// when the vCPU must stop.
    fn handle_requests(&mut self, control: &mut Control) -> bool {
        loop {
            let request = if control.paused {
                match control.requests.recv() {
                    Ok(r) => r,
                    Err(_) => return false,
                }
            } else {
                match control.requests.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::TryRecvError::Empty) => return true,
                    Err(mpsc::TryRecvError::Disconnected) => return false,
                }
            };
            let reply = match request {
                VcpuRequest::Stop => return false,
                VcpuRequest::Pause => {
                    if !control.paused {
                        control.paused_at = Some(Instant::now());
                        self.complete_pending_io();
                        control.paused = true;
                    }
                    VcpuReply::Done
                }
                VcpuRequest::Resume => {
                    control.paused = false;
                    let stopped = control.paused_at.take().map(|at| at.elapsed());
                    VcpuReply::Resumed(stopped.unwrap_or_default())
                }
                VcpuRequest::SaveState => {
                    match VcpuState::save(self.index, &self.fd, &control.msr_list) {
                        Ok(state) => VcpuReply::State(Box::new(state)),
                        Err(e) => VcpuReply::Failed(format!("vCPU {}: {e}", self.index)),
                    }
                }
            };
            if control.replies.send(reply).is_err() {
                return false;
            }
        }
    }

    /// Lets KVM finish an I/O instruction whose data the VMM supplied after the last exit, so
    /// that the registers read next include its result.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_once(&mut self) -> Result<Option<ExitReason>, kvm_ioctls::Error> {
        let index = self.index;
        let exit = self.fd.run()?;
        self.metrics.exits.fetch_add(1, Ordering::Relaxed);
        let outcome = match exit {
            VcpuExit::IoIn(port, data) => {
                self.metrics.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.buses.pio.read(u64::from(port), data) {
                    // Nothing decodes the port: the ISA bus floats high.
                    data.fill(0xff);
                    self.metrics.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                self.metrics.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.buses.pio.write(u64::from(port), data) {
                    self.metrics.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
                // Non-blocking: whichever of this vCPU and the event loop reads the pulse first
                // reports the reset.
                (self.reset_line.ports.contains(&port) && self.reset_line.evt.read().is_ok())
                    .then_some(ExitReason::GuestReset)
            }
            VcpuExit::MmioRead(addr, data) => {
                self.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.buses.mmio.read(addr, data) {
                    data.fill(0xff);
                    self.metrics.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.metrics.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.buses.mmio.write(addr, data) {
                    self.metrics.unhandled_accesses.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => None,
            // A triple fault: what a guest does when it resets itself without a reset device.
            VcpuExit::Shutdown => Some(ExitReason::TripleFault),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::GuestReset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestShutdown,
                other => ExitReason::VcpuError(format!("vCPU {index}: unexpected system event {other}")),
            }),
            // The in-kernel LAPIC handles HLT; reaching here means the vCPU can never wake.
            VcpuExit::Hlt => Some(ExitReason::GuestShutdown),
            VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::VcpuError(format!(
                "vCPU {index}: KVM could not enter the guest (hardware entry failure {reason:#x} on host CPU {cpu})"
            ))),
            VcpuExit::InternalError => Some(ExitReason::VcpuError(self.describe_internal_error())),
            other => Some(ExitReason::VcpuError(format!(
                "vCPU {index}: unexpected KVM exit {other:?}"
            ))),
        };
        Ok(outcome)
    }

    /// Explains a KVM internal error; on PVM hosts this is usually an instruction the emulator
    /// cannot run at guest CPL0.
    fn describe_internal_error(&mut self) -> String {
        // SAFETY: KVM filled the `internal` member of the union for a KVM_EXIT_INTERNAL_ERROR
        // exit, which is the exit being handled.
        let (suberror, ndata) = unsafe {
            let internal = &self.fd.get_kvm_run().__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata)
        };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let what = match suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            _ => "internal error",
        };
        format!(
            "vCPU {}: KVM {what} (suberror {suberror}, {ndata} data words) at guest RIP {rip:#x}",
            self.index
        )
    }
}

/// What the VM's owner asks of a vCPU thread.
pub enum VcpuRequest {
    /// Stop running guest code (pending I/O completed) and wait for further requests.
    Pause,
    /// Run the guest again.
    Resume,
    /// Read the vCPU's state (only while paused).
    SaveState,
    /// End the thread.
    Stop,
}

/// A vCPU thread's answer.
pub enum VcpuReply {
    /// The request was carried out.
    Done,
    /// Resumed; the guest had been stopped on this vCPU this long (from the pause request's
    /// exit from KVM_RUN to now, just before re-entering it).
    Resumed(Duration),
    /// The saved state.
    State(Box<VcpuState>),
    /// It could not be carried out.
    Failed(String),
}

/// The vCPU thread's side of the request channel.
struct Control {
    requests: mpsc::Receiver<VcpuRequest>,
    replies: mpsc::Sender<VcpuReply>,
    msr_list: Arc<Vec<u32>>,
    paused: bool,
    /// When the last pause stopped the guest on this vCPU.
    paused_at: Option<Instant>,
}

/// How long a vCPU thread may take to answer before the owner gives up on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the owner looks for a vCPU's answer before it blocks waiting for it.
const REPLY_SPIN: Duration = Duration::from_millis(1);

/// Looks for a message on `rx` for up to `spin`, yielding between looks (`Ok(None)`: none came):
/// an answer that comes within microseconds is taken then, not when a blocked thread is woken,
/// which on a busy host can be a millisecond later.
pub(crate) fn spin_recv<T>(
    rx: &mpsc::Receiver<T>,
    spin: Duration,
) -> Result<Option<T>, mpsc::RecvError> {
    let started = Instant::now();
    while started.elapsed() < spin {
        match rx.try_recv() {
            Ok(message) => return Ok(Some(message)),
            Err(mpsc::TryRecvError::Disconnected) => return Err(mpsc::RecvError),
            Err(mpsc::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    Ok(None)
}

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u32,
    requests: mpsc::Sender<VcpuRequest>,
    replies: mpsc::Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<VcpuMetrics>,
}

impl VcpuHandle {
    /// The vCPU's counters.
    pub fn metrics(&self) -> &Arc<VcpuMetrics> {
        &self.metrics
    }

    /// Interrupts a KVM_RUN in progress so the thread looks at its requests.
    fn kick(&self) {
        if let Some(thread) = &self.thread {
            if let Err(e) = thread.kill(kick_signal()) {
                log::warn!("vCPU {}: cannot signal its thread: {e}", self.index);
            }
        }
    }

    /// Sends a request and waits for the answer.
    pub fn request(&self, request: VcpuRequest) -> Result<VcpuReply, String> {
        self.post(request)?;
        self.answer()
    }

    /// Sends a request and interrupts the thread's KVM_RUN so that it looks at it; the answer
    /// comes from [`VcpuHandle::answer`].
    pub fn post(&self, request: VcpuRequest) -> Result<(), String> {
        self.requests
            .send(request)
            .map_err(|_| format!("vCPU {} has stopped", self.index))?;
        self.kick();
        Ok(())
    }

    /// Waits for the answer to the request posted last.
    pub fn answer(&self) -> Result<VcpuReply, String> {
        let stopped = || format!("vCPU {} has stopped", self.index);
        // Most answers come within tens of microseconds: looking for one for a short while
        // costs less than being woken late on a busy host (the pause of a live migration's
        // switch, a fault-tolerance epoch).
        let started = std::time::Instant::now();
        match spin_recv(&self.replies, REPLY_SPIN) {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(mpsc::RecvError) => return Err(stopped()),
        }
        // The thread may have been between its request check and KVM_RUN when the first kick
        // landed; the handler's immediate-exit flag covers that, and kicking again is harmless.
        let deadline = started + REPLY_TIMEOUT;
        loop {
            match self.replies.recv_timeout(Duration::from_millis(20)) {
                Ok(reply) => return Ok(reply),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(stopped()),
                Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {
                    self.kick()
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "vCPU {} did not answer within {REPLY_TIMEOUT:?}",
                        self.index
                    ))
                }
            }
        }
    }

    /// Asks the vCPU to stop and waits until its thread has ended.
    pub fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.requests.send(VcpuRequest::Stop);
        while !thread.is_finished() {
            if let Err(e) = thread.kill(kick_signal()) {
                log::warn!("vCPU {}: cannot signal its thread: {e}", self.index);
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if thread.join().is_err() {
            log::error!("vCPU {}: its thread panicked", self.index);
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn monotonic_ns() -> u128 {
    // SAFETY: timespec is plain data that clock_gettime fills.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC is always available; `ts` is valid for writing.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit` byte, for the kick signal handler.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an async-signal-safe store: a const-initialised thread-local needs no allocation.
    let target = KICK_TARGET.with(|t| t.get());
    if !target.is_null() {
        // SAFETY: the pointer is the `immediate_exit` byte of this thread's mapped kvm_run
        // structure, set by `run_loop` and cleared before that mapping can go away.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmmsys_errno::Error>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
        .map_err(VcpuError::Signal)
}
