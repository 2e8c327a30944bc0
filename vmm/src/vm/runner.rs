//! Running a VM: its owner thread's event loop, the vCPU threads, and the commands the control
//! plane sends it (pause, resume, status, stop). The control plane never touches the VM's
//! internals: it sends a [`VmCommand`] through a [`VmControl`] and waits for the [`VmReply`].

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use lockstep_devices::legacy::{Overflow, SerialInput};
use lockstep_seccomp::ThreadKind;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use super::snapshot::{self, SnapshotPaths, SnapshotStats};
use super::{Vm, VmError};
use crate::console::ConsoleSocket;
use crate::event_loop::ExitWatcher;
use crate::exit::ExitReason;
use crate::vcpu::{VcpuHandle, VcpuReply, VcpuRequest};

/// Host input for the guest's serial console.
pub trait ConsoleInput: Read + AsRawFd + Send {
    /// True when a person types this input at a terminal: it is then read even while the guest
    /// takes none, so the console escape always works.
    fn is_terminal(&self) -> bool {
        false
    }
}
impl ConsoleInput for std::fs::File {}

/// A boxed [`ConsoleInput`] as one sized type, for the serial input subscriber.
struct BoxedInput(Box<dyn ConsoleInput>);

impl Read for BoxedInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl AsRawFd for BoxedInput {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Whether the guest's vCPUs and devices are running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Executing guest code.
    Running,
    /// Stopped where it was; resumes exactly there.
    Paused,
}

/// What the control plane can ask of a running VM.
#[derive(Debug)]
pub enum VmCommand {
    /// Stop every vCPU and device where it is.
    Pause,
    /// Carry on after a pause.
    Resume,
    /// Report the run state.
    Status,
    /// End the VM now (the guest is not asked).
    Stop,
    /// Write a snapshot (pausing around it if the VM runs).
    Snapshot(SnapshotPaths),
    /// Press Ctrl-Alt-Del on the guest's keyboard: a cooperating guest shuts down or reboots.
    SendCtrlAltDel,
    /// Hand out guest memory and the KVM VM, for a migration to read pages and the dirty log.
    MigrationAccess,
    /// The whole machine state as a snapshot state file; the VM must be paused.
    CaptureState,
    /// Make every drive's completed writes durable (live migration's switch).
    FlushDrives,
    /// Another descriptor on every open vsock connection's host socket with its state, and on
    /// the console client's; the VM must be paused (a same-host migration's switch).
    HandOverConnections,
    /// Fault tolerance's output commit on the network interfaces.
    Output(OutputCommand),
    /// Fault tolerance: start (true) or stop recording which blocks guest writes touch.
    TrackDiskWrites(bool),
    /// Fault tolerance: the blocks written since the last call, read from every drive; the VM
    /// must be paused. The answer is [`VmReply::DiskEpoch`].
    TakeDiskEpoch,
    /// Fault tolerance: hold the VM paused for a checkpoint (quietly: many a second), pausing
    /// it if it runs; the answer is the state it was in. Until `CheckpointResume`, the user's
    /// `Pause` and `Resume` only say which state the VM takes then.
    CheckpointPause,
    /// Fault tolerance: end a checkpoint's hold; the VM runs again unless its user paused it.
    /// The answer is [`VmReply::Resumed`].
    CheckpointResume,
}

/// What fault tolerance asks of the network interfaces' output gate (see
/// `lockstep_devices::virtio::net` and [`crate::device_manager::DeviceManager`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputCommand {
    /// Hold every frame the guest sends (true), or release all and send directly (false).
    Gate(bool),
    /// Close the current epoch of held frames; the answer is [`VmReply::OutputEpoch`].
    MarkEpoch,
    /// Send the held frames of every epoch up to `upto`, each only if it is not yet `by` (a
    /// process that was stopped for longer than that may have been replaced meanwhile): what
    /// is still held then waits for the next release.
    Release {
        /// The last epoch to send.
        upto: u64,
        /// The latest time to send it.
        by: std::time::Instant,
    },
    /// Drop what is held and never send a frame again (a primary that lost the arbiter).
    Fence,
}

/// What a migration reads while the VM runs: its memory and its KVM VM (for the dirty log).
#[derive(Clone)]
pub struct MigrationAccess {
    /// Guest memory (the same mappings the VM uses).
    pub memory: crate::memory::GuestMemoryMmap,
    /// The KVM VM.
    pub vm_fd: Arc<kvm_ioctls::VmFd>,
    /// Whether the config keeps KVM's dirty log on all the time.
    pub track_dirty_pages: bool,
    /// Another descriptor on every network interface's tap (interface id, descriptor), for a
    /// same-host migration to hand over.
    pub taps: Vec<(String, Arc<std::fs::File>)>,
    /// Another descriptor on the vsock device's listener, and the flag that keeps its socket
    /// file when the VM goes.
    pub vsock: Option<(Arc<std::fs::File>, Arc<std::sync::atomic::AtomicBool>)>,
    /// Every network interface's counters (fault tolerance watches the output it holds).
    pub net_metrics: Vec<Arc<lockstep_devices::virtio::net::NetMetrics>>,
}

impl MigrationAccess {
    /// Says that another process on this host owns the VM's sockets now (a same-host migration
    /// has switched): their files stay when this VM goes.
    pub fn sockets_handed_over(&self) {
        if let Some((_, flag)) = &self.vsock {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for MigrationAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationAccess")
    }
}

impl PartialEq for MigrationAccess {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.vm_fd, &other.vm_fd)
    }
}

impl Eq for MigrationAccess {}

/// The VM's answer to a [`VmCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmReply {
    /// Done; the VM is now in this state.
    State(RunState),
    /// Done; the VM is ending.
    Stopping,
    /// The snapshot was written.
    Snapshot(SnapshotStats),
    /// Memory and KVM VM for a migration.
    Access(MigrationAccess),
    /// The machine state (a snapshot state file's bytes).
    MachineState(Vec<u8>),
    /// The open connections, for a same-host migration to hand over.
    Connections(crate::migration::SharedConnections),
    /// The output epoch just closed.
    OutputEpoch(u64),
    /// The blocks written since the last epoch and their bytes, by drive id.
    DiskEpoch(Vec<(String, lockstep_devices::virtio::block::EpochBlocks)>),
    /// Resumed after a checkpoint: how long the guest was stopped (the longest of its vCPUs,
    /// each from its exit for the pause to its re-entry), or `None` when it stays paused.
    Resumed(Option<Duration>),
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VM has ended (or is ending) and takes no more commands.
    #[error("the VM is not running")]
    Gone,
    /// The VM could not carry the command out.
    #[error("{0}")]
    Failed(String),
}

type Envelope = (VmCommand, mpsc::Sender<Result<VmReply, ControlError>>);

/// The control plane's handle on a running VM: a command channel and the eventfd that wakes the
/// VM's event loop.
#[derive(Clone)]
pub struct VmControl {
    commands: mpsc::Sender<Envelope>,
    wake: Arc<EventFd>,
}

/// The VM's side of [`VmControl`].
pub struct ControlReceiver {
    commands: mpsc::Receiver<Envelope>,
    wake: Arc<EventFd>,
}

impl VmControl {
    /// A connected pair.
    pub fn new() -> std::io::Result<(VmControl, ControlReceiver)> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok((
            VmControl {
                commands: tx,
                wake: wake.clone(),
            },
            ControlReceiver { commands: rx, wake },
        ))
    }

    /// Sends a command and waits (at most `timeout`) for the VM's answer.
    pub fn call(&self, command: VmCommand, timeout: Duration) -> Result<VmReply, ControlError> {
        self.post(command)?.wait(timeout)
    }

    /// Sends a command; its answer comes from [`PendingReply::wait`], so that the caller can
    /// work meanwhile.
    pub fn post(&self, command: VmCommand) -> Result<PendingReply, ControlError> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.commands
            .send((command, reply_tx))
            .map_err(|_| ControlError::Gone)?;
        self.wake.write(1).map_err(|_| ControlError::Gone)?;
        Ok(PendingReply(reply_rx))
    }
}

/// How long the owner thread looks for the command that ends a checkpoint's pause before it
/// goes back to waiting on its event loop.
const CHECKPOINT_SPIN: Duration = Duration::from_millis(10);

/// The answer to a command sent with [`VmControl::post`].
pub struct PendingReply(mpsc::Receiver<Result<VmReply, ControlError>>);

/// How long a caller looks for a VM's answer before it blocks waiting for it.
const ANSWER_SPIN: Duration = Duration::from_millis(1);

impl PendingReply {
    /// Waits (at most `timeout`) for the answer.
    pub fn wait(self, timeout: Duration) -> Result<VmReply, ControlError> {
        // Most answers come within a few hundred microseconds: looking for one for a short
        // while costs less than being woken late on a busy host.
        self.wait_spinning(ANSWER_SPIN, timeout)
    }

    /// Waits (at most `timeout`) for an answer that is not urgent, asleep from the start: where
    /// looking for it would take a core from the guest.
    pub fn wait_asleep(self, timeout: Duration) -> Result<VmReply, ControlError> {
        self.wait_spinning(Duration::ZERO, timeout)
    }

    fn wait_spinning(self, spin: Duration, timeout: Duration) -> Result<VmReply, ControlError> {
        let started = std::time::Instant::now();
        match crate::vcpu::spin_recv(&self.0, spin.min(timeout)) {
            Ok(Some(reply)) => return reply,
            Ok(None) => {}
            Err(mpsc::RecvError) => return Err(ControlError::Gone),
        }
        match self
            .0
            .recv_timeout(timeout.saturating_sub(started.elapsed()))
        {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ControlError::Failed(format!(
                "no answer within {timeout:?}"
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ControlError::Gone),
        }
    }
}

/// Wakes the event loop when a command arrives; the loop itself then handles it.
struct ControlWaker(Arc<EventFd>);

impl MutEventSubscriber for ControlWaker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.0, EventSet::IN)) {
            log::error!("cannot watch the VM's control channel: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Everything a running VM's owner thread holds.
struct Running {
    vm: Vm,
    vcpus: Vec<VcpuHandle>,
    state: RunState,
    /// A checkpoint (fault tolerance) holds the VM paused, and the state the user asked for
    /// meanwhile (the VM takes it when the checkpoint ends).
    checkpoint_pause: Option<RunState>,
    /// The console socket, when the VM has one (its client's unread keystrokes go with a
    /// same-host migration).
    console: Option<Arc<Mutex<ConsoleSocket>>>,
}

impl Running {
    /// Sends `request` to every vCPU; the first failure wins.
    fn all_vcpus(&self, request: impl Fn() -> VcpuRequest) -> Result<Vec<VcpuReply>, ControlError> {
        // Every vCPU gets its request before any answer is awaited: they carry them out side
        // by side.
        for vcpu in &self.vcpus {
            vcpu.post(request()).map_err(ControlError::Failed)?;
        }
        self.vcpus
            .iter()
            .map(|v| match v.answer() {
                Ok(VcpuReply::Failed(e)) | Err(e) => Err(ControlError::Failed(e)),
                Ok(reply) => Ok(reply),
            })
            .collect()
    }

    fn pause(&mut self) -> Result<VmReply, ControlError> {
        if let Some(wanted) = self.checkpoint_pause.as_mut() {
            // Paused already: it stays so when the checkpoint ends.
            *wanted = RunState::Paused;
            log::info!("{}: paused", self.vm.name());
            return Ok(VmReply::State(RunState::Paused));
        }
        if self.state == RunState::Running {
            self.all_vcpus(|| VcpuRequest::Pause)?;
            self.state = RunState::Paused;
            log::info!("{}: paused", self.vm.name());
        }
        Ok(VmReply::State(self.state))
    }

    fn resume(&mut self) -> Result<VmReply, ControlError> {
        if let Some(wanted) = self.checkpoint_pause.as_mut() {
            // Running again as soon as the checkpoint ends, within milliseconds.
            *wanted = RunState::Running;
            log::info!("{}: resumed", self.vm.name());
            return Ok(VmReply::State(RunState::Running));
        }
        if self.state == RunState::Paused {
            self.all_vcpus(|| VcpuRequest::Resume)?;
            self.state = RunState::Running;
            log::info!("{}: resumed", self.vm.name());
        }
        Ok(VmReply::State(self.state))
    }

    /// Holds the VM paused for a checkpoint (pausing it if it runs); answers the state it was in.
    fn checkpoint_pause(&mut self) -> Result<VmReply, ControlError> {
        let was = self.checkpoint_pause.unwrap_or(self.state);
        if self.state == RunState::Running {
            self.all_vcpus(|| VcpuRequest::Pause)?;
            self.state = RunState::Paused;
        }
        self.checkpoint_pause = Some(was);
        Ok(VmReply::State(was))
    }

    /// Ends a checkpoint's hold: the VM runs again unless its user paused it.
    fn checkpoint_resume(&mut self) -> Result<VmReply, ControlError> {
        let wanted = self.checkpoint_pause.take().unwrap_or(self.state);
        if wanted == RunState::Paused || self.state == RunState::Running {
            return Ok(VmReply::Resumed(None));
        }
        let replies = self.all_vcpus(|| VcpuRequest::Resume)?;
        self.state = RunState::Running;
        let stopped = replies.iter().filter_map(|r| match r {
            crate::vcpu::VcpuReply::Resumed(stopped) => Some(*stopped),
            _ => None,
        });
        Ok(VmReply::Resumed(Some(stopped.max().unwrap_or_default())))
    }

    fn snapshot(&mut self, paths: &SnapshotPaths) -> Result<VmReply, ControlError> {
        let was_running = self.state == RunState::Running;
        self.pause()?;
        let result = self.write_snapshot(paths);
        if was_running {
            self.resume()?;
        }
        result.map(VmReply::Snapshot)
    }

    /// Another descriptor on every open vsock connection's host socket with its state, and on
    /// the console client's with its unread keystrokes; the VM must be paused.
    fn hand_over_connections(&mut self) -> Result<VmReply, ControlError> {
        if self.state != RunState::Paused {
            return Err(ControlError::Failed("the VM must be paused".into()));
        }
        let fail = |e: std::io::Error| ControlError::Failed(format!("the connections: {e}"));
        let vsock = self.vm.devices.vsock_connections().map_err(fail)?;
        let console = match &self.vm.console_client {
            Some(client) => client
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stream
                .as_ref()
                .map(|s| s.try_clone())
                .transpose()
                .map_err(fail)?,
            None => None,
        };
        let console_input = match (&console, &self.console) {
            (Some(_), Some(socket)) => socket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pending_input(),
            _ => Vec::new(),
        };
        Ok(VmReply::Connections(crate::migration::SharedConnections(
            Arc::new(crate::migration::HandedConnections {
                vsock,
                console,
                console_input,
            }),
        )))
    }

    /// The paused machine's state as a snapshot state file's bytes.
    fn capture_state(&mut self) -> Result<VmReply, ControlError> {
        if self.state != RunState::Paused {
            return Err(ControlError::Failed("the VM must be paused".into()));
        }
        let machine = self.machine_snapshot()?;
        let fail = |e: snapshot::SnapshotError| ControlError::Failed(e.to_string());
        let state = snapshot::encode_state(&machine).map_err(fail)?;
        let memory_bytes = crate::memory::total_bytes(&self.vm.memory);
        let file = snapshot::state_file_bytes(
            &state,
            self.vm.name(),
            machine.vcpus.len() as u32,
            memory_bytes,
        )
        .map_err(fail)?;
        Ok(VmReply::MachineState(file))
    }

    fn machine_snapshot(&mut self) -> Result<snapshot::MachineSnapshot, ControlError> {
        let vcpus = self
            .all_vcpus(|| VcpuRequest::SaveState)?
            .into_iter()
            .map(|reply| match reply {
                VcpuReply::State(state) => Ok(*state),
                _ => Err(ControlError::Failed(
                    "a vCPU did not return its state".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.vm
            .capture(vcpus)
            .map_err(|e| ControlError::Failed(e.to_string()))
    }

    fn write_snapshot(&mut self, paths: &SnapshotPaths) -> Result<SnapshotStats, ControlError> {
        let started = std::time::Instant::now();
        let machine = self.machine_snapshot()?;
        let stats = snapshot::write(paths, &machine, &self.vm.memory)
            .map_err(|e| ControlError::Failed(e.to_string()))?;
        log::info!(
            "{}: snapshot {} written in {:?}",
            self.vm.name(),
            paths.state.display(),
            started.elapsed()
        );
        Ok(stats)
    }

    fn handle(&mut self, command: VmCommand) -> Result<VmReply, ControlError> {
        match command {
            VmCommand::Pause => self.pause(),
            VmCommand::Resume => self.resume(),
            VmCommand::CheckpointPause => self.checkpoint_pause(),
            VmCommand::CheckpointResume => self.checkpoint_resume(),
            VmCommand::Status => Ok(VmReply::State(self.state)),
            VmCommand::Stop => {
                self.vm.exit.signal(ExitReason::Requested { signal: None });
                Ok(VmReply::Stopping)
            }
            VmCommand::Snapshot(paths) => self.snapshot(&paths),
            VmCommand::MigrationAccess => Ok(VmReply::Access(MigrationAccess {
                memory: self.vm.memory.clone(),
                vm_fd: self.vm.vm_fd.clone(),
                track_dirty_pages: self.vm.config.machine_config.track_dirty_pages,
                taps: self
                    .vm
                    .devices
                    .tap_files()
                    .map_err(|e| ControlError::Failed(format!("the taps: {e}")))?
                    .into_iter()
                    .map(|(id, file)| (id, Arc::new(file)))
                    .collect(),
                vsock: self
                    .vm
                    .devices
                    .vsock_listener()
                    .map_err(|e| ControlError::Failed(format!("the vsock socket: {e}")))?
                    .map(|(file, flag)| (Arc::new(file), flag)),
                net_metrics: self.vm.devices.net_metrics(),
            })),
            VmCommand::CaptureState => self.capture_state(),
            VmCommand::HandOverConnections => self.hand_over_connections(),
            VmCommand::TrackDiskWrites(on) => {
                self.vm.devices.track_disk_writes(on);
                Ok(VmReply::State(self.state))
            }
            VmCommand::TakeDiskEpoch => {
                if self.state != RunState::Paused {
                    return Err(ControlError::Failed("the VM must be paused".into()));
                }
                let devices = &self.vm.devices;
                let mut epoch = Vec::new();
                for (drive, blocks) in devices.take_written_blocks() {
                    let mut read = lockstep_devices::virtio::block::EpochBlocks::new();
                    devices
                        .read_disk_blocks(&drive, &blocks, &mut read)
                        .map_err(|e| ControlError::Failed(e.to_string()))?;
                    epoch.push((drive, read));
                }
                Ok(VmReply::DiskEpoch(epoch))
            }
            VmCommand::Output(command) => {
                let devices = &mut self.vm.devices;
                match command {
                    OutputCommand::Gate(on) => devices.gate_network_output(on),
                    OutputCommand::MarkEpoch => {
                        return Ok(VmReply::OutputEpoch(devices.mark_output_epoch()))
                    }
                    // The gate checks `by` before each frame: this process may stop anywhere.
                    OutputCommand::Release { upto, by } => devices.release_output(upto, by),
                    OutputCommand::Fence => devices.fence_output(),
                }
                Ok(VmReply::State(self.state))
            }
            VmCommand::FlushDrives => {
                crate::migration::flush_drives(&self.vm.devices).map_err(ControlError::Failed)?;
                Ok(VmReply::State(self.state))
            }
            VmCommand::SendCtrlAltDel => {
                if self.state != RunState::Running {
                    return Err(ControlError::Failed("the VM is paused".into()));
                }
                self.vm
                    .devices
                    .send_ctrl_alt_del()
                    .map_err(ControlError::Failed)?;
                Ok(VmReply::State(self.state))
            }
        }
    }
}

/// How [`Vm::run`] connects the VM to the outside.
#[derive(Default)]
pub struct RunOptions {
    /// Feeds the serial console.
    pub input: Option<Box<dyn ConsoleInput>>,
    /// A signalfd of termination signals (see [`crate::event_loop::termination_signalfd`]).
    pub signals: Option<OwnedFd>,
    /// Commands from the control plane.
    pub control: Option<ControlReceiver>,
    /// Start paused (a restored VM waiting for a resume).
    pub paused: bool,
}

impl Vm {
    /// Runs the VM on this thread's event loop until it ends, and returns why.
    pub fn run(mut self, options: RunOptions) -> Result<ExitReason, VmError> {
        let RunOptions {
            input,
            signals,
            control,
            paused,
        } = options;
        let exit = self.exit.clone();
        let loop_err = |e: event_manager::Error| VmError::EventLoop(e.to_string());
        let io_err = |e: std::io::Error| VmError::EventLoop(e.to_string());
        let mut devices_loop =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(loop_err)?;
        let mut control_loop =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(loop_err)?;
        // Exits, signals and commands must wake the thread whichever loop it waits in, so their
        // subscribers join both loops; device work is only in the device loop.
        let reset_evt = self.devices.reset_evt().try_clone().map_err(io_err)?;
        let mut always: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> = vec![Arc::new(
            Mutex::new(ExitWatcher::new(exit.clone(), reset_evt, signals)),
        )];
        if let Some(control) = &control {
            always.push(Arc::new(Mutex::new(ControlWaker(control.wake.clone()))));
        }
        for subscriber in always {
            control_loop.add_subscriber(subscriber.clone());
            devices_loop.add_subscriber(subscriber);
        }
        for subscriber in self.devices.event_subscribers() {
            devices_loop.add_subscriber(subscriber.clone());
        }
        let mut console = None;
        if let (Some(path), Some(client), Some(serial)) = (
            self.config.serial.console_socket.clone(),
            self.console_client.clone(),
            self.devices.serial(),
        ) {
            match ConsoleSocket::bind(&path, serial.clone(), client) {
                Ok(socket) => {
                    let socket = Arc::new(Mutex::new(socket));
                    devices_loop.add_subscriber(socket.clone());
                    console = Some(socket);
                }
                Err(e) => log::warn!("{}: console socket {}: {e}", self.name(), path.display()),
            }
        }
        if let (Some(input), Some(serial)) = (input, self.devices.serial()) {
            let overflow = if input.is_terminal() {
                Overflow::Drop
            } else {
                Overflow::Wait
            };
            let serial_input =
                SerialInput::new(BoxedInput(input), serial.clone(), overflow).map_err(io_err)?;
            devices_loop.add_subscriber(Arc::new(Mutex::new(serial_input)));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            vcpus.push(vcpu.start(exit.clone(), self.msr_list.clone(), paused)?);
        }
        let state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        log::info!("{}: {state:?} with {} vCPUs", self.name(), vcpus.len());
        let mut running = Running {
            vm: self,
            vcpus,
            state,
            checkpoint_pause: None,
            console,
        };
        // Everything this thread opens for the VM is open now; from here on it runs the device
        // loop and the control plane's commands under the owner's filter.
        lockstep_seccomp::install(ThreadKind::VmOwner);

        let reason = loop {
            if let Some(reason) = exit.reason() {
                break reason;
            }
            // Device work waits while the VM is paused: the device loop is not even waited on
            // then, so host-side events (a frame on the tap, console input) stay queued in the
            // kernel and nothing touches guest memory until the VM resumes.
            let result = match running.state {
                RunState::Running => devices_loop.run(),
                RunState::Paused => control_loop.run(),
            };
            if let Err(e) = result {
                break ExitReason::VcpuError(format!("event loop failed: {e}"));
            }
            if let Some(control) = &control {
                let mut spinning = None;
                loop {
                    while let Ok((command, reply)) = control.commands.try_recv() {
                        let _ = reply.send(running.handle(command));
                    }
                    // A checkpoint's pause ends with the next command, within milliseconds:
                    // waiting for it awake spares the guest a late wake-up of this thread.
                    let since = *spinning.get_or_insert_with(std::time::Instant::now);
                    if running.checkpoint_pause.is_none() || since.elapsed() >= CHECKPOINT_SPIN {
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        };
        for v in running.vcpus.iter_mut() {
            v.stop_and_join();
        }
        log::info!("{}: stopped: {reason:?}", running.vm.name());
        Ok(reason)
    }
}
