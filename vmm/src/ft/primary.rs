//! The primary of a pair: once the migration stream's full copy is done, a checkpoint every
//! epoch. Each checkpoint pauses the guest only while the dirtied pages are copied into a
//! staging buffer and the machine state is captured; the buffer goes to the secondary with the
//! guest running again, and the next epoch starts once the secondary has acknowledged it.
//! Heartbeats fill the time in between. If the secondary goes silent, the guest waits paused
//! while the arbiter decides: this side runs on unprotected if it wins, and stops its VM if the
//! secondary won (it has taken over) or the arbiter cannot say.

use std::io::Write;
use std::time::{Duration, Instant};

use lockstep_api::migration::{
    DriveOverride, FtOptions, FtRedundancy, FtStandby, FtStatus, IncomingRequest, MigrationPhase,
    NetworkOverride, VsockOverride,
};
use lockstep_api::VmConfig;

use super::arbiter::{Arbiter, ArbiterConfig, ArbiterError, Observed};
use super::beacon::{Beacon, BeaconKey, Role};
use super::{PairOptions, Pauses};
use lockstep_devices::virtio::block::replica::FULL_COPY_CHUNK;
use lockstep_devices::virtio::block::FullCopy;

use crate::migration::dirty::{Bits, DirtyLog};
use crate::migration::protocol::{read_frame, reason_text, write_frame, Conn, Kind};
use crate::migration::send::{Failure, PageWriter, Sender};
use crate::vm::{OutputCommand, VmCommand, VmControl, VmReply};

/// While the guest has output held back, the next checkpoint comes this soon after the last
/// one began (or at the epoch's end, if that is sooner): output waits about this long instead
/// of a whole epoch.
pub const OUTPUT_EPOCH: Duration = Duration::from_millis(10);

/// How long the VM's owner thread has for a command.
const VM_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait for a checkpoint's acknowledgement while the secondary still sends
/// heartbeats (it may be applying a large one).
const ACK_PATIENCE: Duration = Duration::from_secs(10);

fn runs_on(why: impl Into<String>) -> Failure {
    Failure {
        why: why.into(),
        source_runs: true,
    }
}

/// Makes this host the pair's live side in the arbiter (or finds it is already).
fn claim_pair(arbiter: &Arbiter, ft: &PairOptions) -> Result<Observed, Failure> {
    let seen = arbiter
        .read(&ft.pair)
        .map_err(|e| runs_on(format!("the arbiter: {e}")))?;
    match seen {
        None => arbiter
            .claim(&ft.pair, &ft.host_id, None)
            .map_err(|e| runs_on(format!("the arbiter: {e}"))),
        Some(seen) if seen.record.live == ft.host_id => Ok(seen),
        Some(seen) => Err(runs_on(format!(
            "the arbiter names {} live for pair {:?} (epoch {}): not pairing",
            seen.record.live, ft.pair, seen.record.epoch
        ))),
    }
}

/// Runs the pairing until it ends: an error always (unpaired, or a side lost), saying whether
/// the VM still runs here.
pub(crate) fn protect(
    s: &Sender,
    ft: &PairOptions,
    log: &DirtyLog,
    pending: Vec<Bits>,
    mut pages: PageWriter,
    reader: &mut Conn,
) -> Result<(), Failure> {
    let arbiter = Arbiter::new(ArbiterConfig::new(ft.arbiter.clone()));
    let observed = claim_pair(&arbiter, ft)?;
    let control = s
        .host
        .vm_control(&s.vm)
        .map_err(|e| runs_on(format!("the VM: {e}")))?;
    reader
        .set_read_timeout(ft.timeout)
        .map_err(|e| runs_on(e.to_string()))?;
    s.migration.set_phase(MigrationPhase::Protecting);
    log::info!(
        "{}: protected by a secondary (pair {:?}, epochs of {:?})",
        s.vm,
        ft.pair,
        ft.epoch
    );
    // The second heartbeat path, when both sides have one: the secondary then sends first.
    let beacon = match &s.beacon_socket {
        Some(socket) => {
            let key = BeaconKey {
                token: s.token.clone(),
                pair: ft.pair.clone(),
            };
            Some(
                Beacon::start(socket, Role::Primary, None, key, ft.heartbeat())
                    .map_err(|e| runs_on(format!("the second heartbeat path: {e}")))?,
            )
        }
        None => None,
    };
    let mut pairing = Pairing {
        beacon,
        s,
        ft,
        arbiter,
        observed,
        control,
        pauses: Pauses::default(),
        committed: None,
        rate: (Instant::now(), 0),
        sent: 0,
        drives: Vec::new(),
        spare: Vec::new(),
    };
    // Disks: writes are recorded from before the full copy starts, so that what the copy
    // missed comes with the first checkpoint.
    let drives = match s.host.running_config(&s.vm) {
        Ok(config) => config.drives.iter().map(|d| d.drive_id.clone()).collect(),
        Err(e) => return Err(runs_on(format!("the VM's config: {e}"))),
    };
    pairing.drives = drives;
    if let Err(e) = pairing.call(VmCommand::TrackDiskWrites(true)) {
        return Err(runs_on(format!("recording disk writes: {e}")));
    }
    if let Err(why) = pairing.copy_disks(&mut pages.out) {
        let _ = pairing.call(VmCommand::TrackDiskWrites(false));
        return Err(runs_on(why));
    }
    // Output commit: from here on the guest's frames leave only once the secondary has the
    // checkpoint that follows them.
    if let Err(e) = pairing.call(VmCommand::Output(OutputCommand::Gate(true))) {
        return Err(runs_on(format!("holding the guest's output: {e}")));
    }
    let mut extra = Some(pending);
    let mut epoch = 0u64;
    loop {
        let started = Instant::now();
        if s.migration.is_cancelled() {
            return Err(pairing.unpair(&mut pages));
        }
        if s.migration.failover_asked() {
            return pairing.fail_over(log, extra.take(), epoch, &mut pages, reader);
        }
        let (staged, output) = match pairing.checkpoint(log, extra.take(), epoch, &pages, false) {
            Ok(staged) => staged,
            Err(_) if s.migration.is_cancelled() => return Err(pairing.unpair(&mut pages)),
            Err(why) => return Err(pairing.secondary_lost(&why)),
        };
        // The secondary acknowledges after it has all of the checkpoint, and cannot take over
        // until its heartbeat timeout has passed after that: from before the send on, at the
        // earliest.
        let sending = Instant::now();
        let sent = pages
            .out
            .write_all(&staged)
            .and_then(|()| pages.out.flush());
        if let Err(e) = sent {
            return Err(pairing.secondary_lost(&format!("sending checkpoint {epoch}: {e}")));
        }
        pairing.sent += staged.len() as u64;
        pairing.keep_buffer(staged);
        let their_timeout = match wait_ack(reader, epoch, ft.timeout) {
            Ok(timeout) => timeout,
            Err(why) => return Err(pairing.secondary_lost(&why)),
        };
        pairing.committed = Some((epoch, Instant::now()));
        // What the guest sent before this checkpoint is safe to show the world now, unless
        // this process was stopped for long enough since the send that the secondary may have
        // taken over meanwhile (an ack read late says nothing about when it came). The gate
        // checks that deadline before each frame: past it the output stays held, the next
        // acknowledged checkpoint releases it, and a secondary that took over fails that
        // checkpoint instead (then the arbiter decides).
        let release = OutputCommand::Release {
            upto: output,
            by: sending + their_timeout / 2,
        };
        if let Err(e) = pairing.call(VmCommand::Output(release)) {
            return Err(pairing.secondary_lost(&format!("releasing output: {e}")));
        }
        pairing.report(epoch);
        // Heartbeats until the next checkpoint: at the epoch's end, or sooner while the guest
        // has output held back (it waits for the next checkpoint to be acknowledged).
        let mut beat_at = Instant::now();
        loop {
            let since = started.elapsed();
            if since >= ft.epoch || (since >= OUTPUT_EPOCH.min(ft.epoch) && output_held(&pages)) {
                break;
            }
            let step = ft.epoch.saturating_sub(since).min(Duration::from_millis(1));
            std::thread::sleep(step);
            if beat_at.elapsed() >= ft.heartbeat() {
                beat_at = Instant::now();
                let beat = write_frame(&mut pages.out, Kind::Heartbeat, &[])
                    .and_then(|()| pages.out.flush());
                if let Err(e) = beat {
                    return Err(pairing.secondary_lost(&format!("heartbeat: {e}")));
                }
            }
        }
        epoch += 1;
    }
}

/// True when a network interface holds frames the guest sent since the last checkpoint.
fn output_held(pages: &PageWriter) -> bool {
    pages
        .access
        .net_metrics
        .iter()
        .any(|m| m.tx_held_frames.load(std::sync::atomic::Ordering::Relaxed) > 0)
}

/// Reads the secondary's frames until the acknowledgement of `epoch`; each read waits at most
/// the heartbeat timeout. Returns the secondary's heartbeat timeout (`timeout` if its ack does
/// not say).
fn wait_ack(reader: &mut Conn, epoch: u64, timeout: Duration) -> Result<Duration, String> {
    let deadline = Instant::now() + ACK_PATIENCE.max(timeout * 20);
    loop {
        let frame = read_frame(reader).map_err(|e| format!("waiting for ack {epoch}: {e}"))?;
        match frame.kind {
            Kind::Heartbeat => {}
            Kind::Ack => {
                let acked = frame
                    .payload
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or("a malformed Ack frame")?;
                if acked == epoch {
                    let theirs = frame
                        .payload
                        .get(8..16)
                        .and_then(|b| b.try_into().ok())
                        .map(|b| {
                            u64::from_le_bytes(b)
                                .clamp(*super::TIMEOUT_MS.start(), *super::TIMEOUT_MS.end())
                        })
                        .map(Duration::from_millis);
                    return Ok(theirs.unwrap_or(timeout));
                }
                return Err(format!("the secondary acknowledged {acked}, not {epoch}"));
            }
            Kind::Abort | Kind::Refuse => {
                return Err(format!(
                    "the secondary gave up: {}",
                    reason_text(&frame.payload)
                ))
            }
            other => return Err(format!("the secondary sent {other:?}")),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no ack for checkpoint {epoch} within {ACK_PATIENCE:?}"
            ));
        }
    }
}

struct Pairing<'a> {
    /// The second heartbeat path, if this pairing has one.
    beacon: Option<Beacon>,
    s: &'a Sender,
    ft: &'a PairOptions,
    arbiter: Arbiter,
    observed: Observed,
    control: VmControl,
    pauses: Pauses,
    /// The last acknowledged epoch and when.
    committed: Option<(u64, Instant)>,
    /// The start of the current rate window and the bytes sent before it.
    rate: (Instant, u64),
    sent: u64,
    /// The VM's drive ids in config order (their index names them on the stream).
    drives: Vec<String>,
    /// The last checkpoint's staging buffer, kept for the next: growing a new one (and
    /// faulting its pages in) inside the pause took as long as copying the pages.
    spare: Vec<u8>,
}

impl Pairing<'_> {
    fn call(&self, command: VmCommand) -> Result<VmReply, String> {
        self.control
            .call(command, VM_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    /// Sends every drive's image, in chunks, holes skipped, while the guest runs.
    fn copy_disks(&self, out: &mut impl Write) -> Result<(), String> {
        let config = self
            .s
            .host
            .running_config(&self.s.vm)
            .map_err(|e| e.to_string())?;
        let mut frame = Vec::with_capacity(12 + FULL_COPY_CHUNK);
        for (index, drive) in config.drives.iter().enumerate() {
            let path = &drive.path_on_host;
            let copy = FullCopy::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            frame.clear();
            frame.extend_from_slice(&(index as u32).to_le_bytes());
            frame.extend_from_slice(&copy.size().to_le_bytes());
            write_frame(out, Kind::DiskBegin, &frame).map_err(|e| e.to_string())?;
            for chunk in copy {
                let (offset, bytes) = chunk.map_err(|e| format!("{}: {e}", path.display()))?;
                frame.clear();
                frame.extend_from_slice(&(index as u32).to_le_bytes());
                frame.extend_from_slice(&offset.to_le_bytes());
                frame.extend_from_slice(&bytes);
                write_frame(out, Kind::DiskChunk, &frame).map_err(|e| e.to_string())?;
                if self.s.migration.is_cancelled() {
                    return Err("cancelled by request".into());
                }
            }
            log::info!(
                "{}: drive {:?} copied to the secondary",
                self.s.vm,
                drive.drive_id
            );
        }
        out.flush().map_err(|e| e.to_string())
    }

    /// Pauses the guest, stages the pages dirtied since the last checkpoint (and `extra`) and
    /// the machine state, closes the epoch of held output, and resumes the guest; returns the
    /// staged frames (the `Checkpoint` last) and the output epoch they cover.
    fn checkpoint(
        &mut self,
        log: &DirtyLog,
        extra: Option<Vec<Bits>>,
        epoch: u64,
        pages: &PageWriter,
        keep_paused: bool,
    ) -> Result<(Vec<u8>, u64), String> {
        // The owner holds the VM paused until CheckpointResume, whatever its user asks
        // meanwhile; a VM its user paused stays paused then.
        self.call(VmCommand::CheckpointPause)?;
        let mut buffer = std::mem::take(&mut self.spare);
        buffer.clear();
        let staged = (|| {
            let post = |command| self.control.post(command).map_err(|e| e.to_string());
            let output = post(VmCommand::Output(OutputCommand::MarkEpoch))?;
            let disks = post(VmCommand::TakeDiskEpoch)?;
            let captured = post(VmCommand::CaptureState)?;
            let mut bits = log.take()?;
            for (region, more) in bits.iter_mut().zip(extra.iter().flatten()) {
                for (word, extra) in region.iter_mut().zip(more) {
                    *word |= extra;
                }
            }
            let mut staging = pages.staging(buffer);
            staging.send(Some(&bits))?;
            let written = match disks.wait(VM_TIMEOUT).map_err(|e| e.to_string())? {
                VmReply::DiskEpoch(written) => written,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let mut frame = Vec::with_capacity(12 + 4096);
            for (drive, blocks) in &written {
                let index = self
                    .drives
                    .iter()
                    .position(|d| d == drive)
                    .ok_or_else(|| format!("no drive {drive:?} in the config"))?;
                for (block, bytes) in blocks.iter() {
                    frame.clear();
                    frame.extend_from_slice(&(index as u32).to_le_bytes());
                    frame.extend_from_slice(&block.to_le_bytes());
                    frame.extend_from_slice(bytes);
                    write_frame(&mut staging.out, Kind::DiskBlock, &frame)
                        .map_err(|e| e.to_string())?;
                }
            }
            let state = match captured.wait(VM_TIMEOUT).map_err(|e| e.to_string())? {
                VmReply::MachineState(bytes) => bytes,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let mut payload = epoch.to_le_bytes().to_vec();
            payload.extend_from_slice(&state);
            write_frame(&mut staging.out, Kind::Checkpoint, &payload).map_err(|e| e.to_string())?;
            match output.wait(VM_TIMEOUT).map_err(|e| e.to_string())? {
                VmReply::OutputEpoch(closed) => Ok((staging.out, closed)),
                other => Err(format!("unexpected answer {other:?}")),
            }
        })();
        // The guest runs again whatever happened (a failed checkpoint is the secondary's loss),
        // but for a planned failover's last checkpoint.
        if !keep_paused || staged.is_err() {
            // The guest runs again once the owner has the command: its answer is not urgent,
            // and looking for it would take a core from the guest.
            let resumed = self
                .control
                .post(VmCommand::CheckpointResume)
                .and_then(|reply| reply.wait_asleep(VM_TIMEOUT))
                .map_err(|e| e.to_string())?;
            if let VmReply::Resumed(Some(stopped)) = resumed {
                self.pauses.add(stopped);
            }
        }
        staged
    }

    /// Keeps a sent checkpoint's buffer for the next one, unless it is far larger than what
    /// checkpoints need lately (one burst of writes does not hold its memory for good).
    fn keep_buffer(&mut self, mut buffer: Vec<u8>) {
        const KEEP_ANYWAY: usize = 64 << 20;
        if buffer.capacity() > KEEP_ANYWAY && buffer.len() < buffer.capacity() / 4 {
            buffer = Vec::new();
        }
        self.spare = buffer;
    }

    fn report(&mut self, epoch: u64) {
        let window = self.rate.0.elapsed();
        let rate = (self.sent - self.rate.1) as f64 / window.as_secs_f64().max(1e-3);
        if window > Duration::from_secs(1) {
            self.rate = (Instant::now(), self.sent);
        }
        let status = FtStatus {
            role: "primary".into(),
            pair: self.ft.pair.clone(),
            epoch: epoch + 1,
            committed_epoch: self.committed.map(|(e, _)| e),
            since_commit_ms: self
                .committed
                .map(|(_, at)| at.elapsed().as_secs_f64() * 1e3),
            pause_p50_ms: self.pauses.quantile(0.5),
            pause_p99_ms: self.pauses.quantile(0.99),
            replication_mib_s: rate / (1 << 20) as f64,
            arbiter_epoch: self.observed.record.epoch,
            redundancy: FtRedundancy::Full,
        };
        let sent = self.sent;
        self.s.migration.update(|i| {
            i.bytes = sent;
            i.ft = Some(status);
        });
    }

    /// Records how protected the VM is now (and the arbiter's epoch, when it moved).
    fn set_redundancy(&self, redundancy: FtRedundancy, arbiter_epoch: Option<u64>) {
        self.s.migration.update(|i| {
            if let Some(ft) = i.ft.as_mut() {
                ft.redundancy = redundancy;
                if let Some(epoch) = arbiter_epoch {
                    ft.arbiter_epoch = epoch;
                }
            }
        });
    }

    /// A planned failover: a last checkpoint with the guest left paused, then the secondary
    /// takes over and says so; this copy ends once it has, with its output up to the last
    /// checkpoint released (the secondary has it) and nothing after. Then the roles switch:
    /// this host opens a listener to stand by as the secondary and tells the new primary
    /// where it is (`Rejoin`), and the new primary pairs with it.
    fn fail_over(
        &mut self,
        log: &DirtyLog,
        extra: Option<Vec<Bits>>,
        epoch: u64,
        pages: &mut PageWriter,
        reader: &mut Conn,
    ) -> Result<(), Failure> {
        let vm = &self.s.vm;
        log::info!("{vm}: planned failover to the secondary at checkpoint {epoch}");
        let (staged, output) = match self.checkpoint(log, extra, epoch, pages, true) {
            Ok(done) => done,
            Err(why) => return Err(self.secondary_lost(&why)),
        };
        let sent = pages
            .out
            .write_all(&staged)
            .and_then(|()| write_frame(&mut pages.out, Kind::Failover, &[]))
            .and_then(|()| pages.out.flush());
        if let Err(e) = sent {
            return Err(self.secondary_lost(&format!("sending the last checkpoint: {e}")));
        }
        let running = wait_ack(reader, epoch, self.ft.timeout).and_then(|_| loop {
            let frame = read_frame(reader).map_err(|e| format!("waiting for Running: {e}"))?;
            match frame.kind {
                Kind::Heartbeat => {}
                Kind::Running => break Ok(()),
                Kind::Abort | Kind::Refuse => {
                    break Err(format!(
                        "the secondary could not take over: {}",
                        reason_text(&frame.payload)
                    ))
                }
                other => break Err(format!("the secondary sent {other:?}")),
            }
        });
        if let Err(why) = running {
            return Err(self.secondary_lost(&why));
        }
        // This host's own images, taps and vsock socket, for standing by as the secondary.
        let config = self.s.host.running_config(vm);
        let release = OutputCommand::Release {
            upto: output,
            by: Instant::now() + self.ft.timeout,
        };
        let _ = self.call(VmCommand::Output(release));
        let _ = self.call(VmCommand::Output(OutputCommand::Fence));
        self.s.host.remove_migrated(vm);
        log::info!("{vm}: the secondary runs the VM now; this copy has ended");
        self.s.migration.update(|i| {
            if let Some(ft) = i.ft.as_mut() {
                ft.role = "primary (failed over)".into();
                ft.redundancy = FtRedundancy::Lost;
            }
        });
        // The roles switch: this host listens for the new primary's pairing. This record
        // ends first, as only one migration of a VM's name may be under way.
        self.s.migration.finish(Ok(()));
        let rejoin = config
            .map_err(|e| e.to_string())
            .and_then(|config| self.listen_as_secondary(&config, reader));
        let told = rejoin.and_then(|listener| {
            let json = serde_json::to_vec(&listener).map_err(|e| e.to_string())?;
            write_frame(&mut pages.out, Kind::Rejoin, &json)
                .and_then(|()| pages.out.flush())
                .map_err(|e| format!("telling the new primary: {e}"))
        });
        match told {
            Ok(()) => log::info!(
                "{vm}: stands by to become the secondary of pair {:?}",
                self.ft.pair
            ),
            Err(why) => {
                log::warn!("{vm}: cannot become the secondary ({why}); the pair runs unprotected")
            }
        }
        Ok(())
    }

    /// Opens this host's listener for the VM's new pairing, with this side's own drive images,
    /// taps and vsock socket, and these pairing options.
    fn listen_as_secondary(&self, config: &VmConfig, conn: &Conn) -> Result<FtStandby, String> {
        let ip = conn
            .local_ip()
            .ok_or("the pairing runs over a Unix socket: no address for the new primary")?;
        let request = IncomingRequest {
            listen: std::net::SocketAddr::new(ip, 0).to_string(),
            name: self.s.vm.clone(),
            network_overrides: config
                .network_interfaces
                .iter()
                .map(|n| NetworkOverride {
                    iface_id: n.iface_id.clone(),
                    host_dev_name: n.host_dev_name.clone(),
                })
                .collect(),
            vsock_override: config.vsock.as_ref().map(|v| VsockOverride {
                uds_path: v.uds_path.clone(),
            }),
            drive_overrides: config
                .drives
                .iter()
                .map(|d| DriveOverride {
                    drive_id: d.drive_id.clone(),
                    path_on_host: d.path_on_host.clone(),
                })
                .collect(),
            ft: Some(FtOptions {
                // This pairing's socket still holds that port.
                heartbeat_path: (self.ft.heartbeat_path)
                    .map(|a| std::net::SocketAddr::new(a.ip(), 0).to_string()),
                ..self.ft.request()
            }),
        };
        let listener = crate::migration::start_incoming(self.s.host.clone(), request)
            .map_err(|e| e.to_string())?;
        Ok(FtStandby {
            destination: listener.listen,
            token: listener.token,
        })
    }

    /// Ends the pairing on request: the secondary is told, so that it drops its copy instead of
    /// taking over.
    fn unpair(&self, pages: &mut PageWriter) -> Failure {
        let _ = write_frame(&mut pages.out, Kind::Abort, b"unpaired by request")
            .and_then(|()| pages.out.flush());
        if let Err(e) = self.call(VmCommand::Output(OutputCommand::Gate(false))) {
            log::error!("{}: cannot release the guest's output: {e}", self.s.vm);
        }
        log::info!("{}: unpaired; runs on unprotected", self.s.vm);
        self.set_redundancy(FtRedundancy::Degraded, None);
        runs_on("unpaired by request")
    }

    /// The secondary is gone (or its stream broke): the guest waits paused while the arbiter
    /// decides which side goes on.
    fn secondary_lost(&self, why: &str) -> Failure {
        let vm = &self.s.vm;
        log::warn!("{vm}: the secondary is lost ({why}); asking the arbiter");
        if self
            .beacon
            .as_ref()
            .is_some_and(|b| b.heard_within(self.ft.timeout))
        {
            log::warn!(
                "{vm}: the secondary still answers on the second heartbeat path: the replication link is down, not the secondary"
            );
        }
        // Held paused (a planned failover's last checkpoint may hold it already) until the
        // arbiter has decided; a user's pause meanwhile is kept.
        let paused = self.call(VmCommand::CheckpointPause);
        let claim = self
            .arbiter
            .claim(&self.ft.pair, &self.ft.host_id, Some(&self.observed));
        let won = match claim {
            Ok(now) => Ok(now),
            Err(ArbiterError::Lost { winner, epoch, .. }) => Err(format!(
                "the secondary took over ({winner}, arbiter epoch {epoch})"
            )),
            Err(e) => {
                // The claim's outcome is unknown: the record says whether it won.
                match self.arbiter.read(&self.ft.pair) {
                    Ok(Some(now))
                        if now.record.live == self.ft.host_id
                            && now.record.epoch == self.observed.record.epoch + 1 =>
                    {
                        Ok(now)
                    }
                    _ => Err(format!("the arbiter cannot say who is live ({e})")),
                }
            }
        };
        match won {
            Ok(now) => {
                // Alone now: what is held goes out, and output flows directly again.
                if let Err(e) = self.call(VmCommand::Output(OutputCommand::Gate(false))) {
                    log::error!("{vm}: cannot release the guest's output: {e}");
                }
                if paused.is_ok() {
                    if let Err(e) = self.call(VmCommand::CheckpointResume) {
                        log::error!("{vm}: cannot resume after winning the arbiter: {e}");
                    }
                }
                log::warn!(
                    "{vm}: runs on unprotected (arbiter epoch {})",
                    now.record.epoch
                );
                self.set_redundancy(FtRedundancy::Degraded, Some(now.record.epoch));
                runs_on(format!(
                    "the secondary was lost ({why}); the VM runs on here unprotected (arbiter epoch {})",
                    now.record.epoch
                ))
            }
            Err(lost) => {
                // Never two live copies: this one ends without running another instruction,
                // and nothing it held back reaches the network.
                let _ = self.call(VmCommand::Output(OutputCommand::Fence));
                log::error!("{vm}: {lost}; stopping this copy");
                self.set_redundancy(FtRedundancy::Lost, None);
                self.s.host.remove_migrated(vm);
                Failure {
                    why: format!("{lost}; this copy is stopped"),
                    source_runs: false,
                }
            }
        }
    }
}
