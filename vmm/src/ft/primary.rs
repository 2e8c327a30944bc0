//! The primary of a pair: once the migration stream's full copy is done, a checkpoint every
//! epoch. Each checkpoint pauses the guest only while the dirtied pages are copied into a
//! staging buffer and the machine state is captured; the buffer goes to the secondary with the
//! guest running again, and the next epoch starts once the secondary has acknowledged it.
//! Heartbeats fill the time in between. If the secondary goes silent, the guest waits paused
//! while the arbiter decides: this side runs on unprotected if it wins, and stops its VM if the
//! secondary won (it has taken over) or the arbiter cannot say.

use std::io::Write;
use std::time::{Duration, Instant};

use lockstep_api::migration::{FtStatus, MigrationPhase};

use super::arbiter::{Arbiter, ArbiterConfig, ArbiterError, Observed};
use super::{PairOptions, Pauses};
use crate::migration::dirty::{Bits, DirtyLog};
use crate::migration::protocol::{read_frame, reason_text, write_frame, Conn, Kind};
use crate::migration::send::{Failure, PageWriter, Sender};
use crate::vm::{RunState, VmCommand, VmControl, VmReply};

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
    let mut pairing = Pairing {
        s,
        ft,
        arbiter,
        observed,
        control,
        pauses: Pauses::default(),
        committed: None,
        rate: (Instant::now(), 0),
        sent: 0,
    };
    let mut extra = Some(pending);
    let mut epoch = 0u64;
    loop {
        let started = Instant::now();
        if s.migration.is_cancelled() {
            return Err(pairing.unpair(&mut pages));
        }
        let staged = match pairing.checkpoint(log, extra.take(), epoch, &pages) {
            Ok(staged) => staged,
            Err(_) if s.migration.is_cancelled() => return Err(pairing.unpair(&mut pages)),
            Err(why) => return Err(pairing.secondary_lost(&why)),
        };
        let sent = pages
            .out
            .write_all(&staged)
            .and_then(|()| pages.out.flush());
        if let Err(e) = sent {
            return Err(pairing.secondary_lost(&format!("sending checkpoint {epoch}: {e}")));
        }
        pairing.sent += staged.len() as u64;
        if let Err(why) = wait_ack(reader, epoch, ft.timeout) {
            return Err(pairing.secondary_lost(&why));
        }
        pairing.committed = Some((epoch, Instant::now()));
        pairing.report(epoch);
        // Heartbeats until the next epoch.
        loop {
            let left = ft.epoch.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(ft.heartbeat()));
            if started.elapsed() < ft.epoch {
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

/// Reads the secondary's frames until the acknowledgement of `epoch`; each read waits at most
/// the heartbeat timeout.
fn wait_ack(reader: &mut Conn, epoch: u64, timeout: Duration) -> Result<(), String> {
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
                    return Ok(());
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
}

impl Pairing<'_> {
    fn call(&self, command: VmCommand) -> Result<VmReply, String> {
        self.control
            .call(command, VM_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    /// Pauses the guest, stages the pages dirtied since the last checkpoint (and `extra`) and
    /// the machine state, and resumes it; returns the staged frames, the `Checkpoint` last.
    fn checkpoint(
        &mut self,
        log: &DirtyLog,
        extra: Option<Vec<Bits>>,
        epoch: u64,
        pages: &PageWriter,
    ) -> Result<Vec<u8>, String> {
        // A VM its user paused stays paused: only a running guest is paused and resumed here.
        let running = self.call(VmCommand::Status)? == VmReply::State(RunState::Running);
        let paused_at = Instant::now();
        if running {
            self.call(VmCommand::Pause)?;
        }
        let staged = (|| {
            let captured = self
                .control
                .post(VmCommand::CaptureState)
                .map_err(|e| e.to_string())?;
            let mut bits = log.take()?;
            for (region, more) in bits.iter_mut().zip(extra.iter().flatten()) {
                for (word, extra) in region.iter_mut().zip(more) {
                    *word |= extra;
                }
            }
            let mut staging = pages.staging(Vec::new());
            staging.send(Some(&bits))?;
            let state = match captured.wait(VM_TIMEOUT).map_err(|e| e.to_string())? {
                VmReply::MachineState(bytes) => bytes,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            let mut payload = epoch.to_le_bytes().to_vec();
            payload.extend_from_slice(&state);
            write_frame(&mut staging.out, Kind::Checkpoint, &payload).map_err(|e| e.to_string())?;
            Ok(staging.out)
        })();
        // The guest runs again whatever happened: a failed checkpoint is the secondary's loss.
        if running {
            self.call(VmCommand::Resume)?;
        }
        self.pauses.add(paused_at.elapsed());
        staged
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
        };
        let sent = self.sent;
        self.s.migration.update(|i| {
            i.bytes = sent;
            i.ft = Some(status);
        });
    }

    /// Ends the pairing on request: the secondary is told, so that it drops its copy instead of
    /// taking over.
    fn unpair(&self, pages: &mut PageWriter) -> Failure {
        let _ = write_frame(&mut pages.out, Kind::Abort, b"unpaired by request")
            .and_then(|()| pages.out.flush());
        log::info!("{}: unpaired; runs on unprotected", self.s.vm);
        runs_on("unpaired by request")
    }

    /// The secondary is gone (or its stream broke): the guest waits paused while the arbiter
    /// decides which side goes on.
    fn secondary_lost(&self, why: &str) -> Failure {
        let vm = &self.s.vm;
        log::warn!("{vm}: the secondary is lost ({why}); asking the arbiter");
        let paused = self.call(VmCommand::Pause);
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
                if paused.is_ok() {
                    if let Err(e) = self.call(VmCommand::Resume) {
                        log::error!("{vm}: cannot resume after winning the arbiter: {e}");
                    }
                }
                log::warn!(
                    "{vm}: runs on unprotected (arbiter epoch {})",
                    now.record.epoch
                );
                runs_on(format!(
                    "the secondary was lost ({why}); the VM runs on here unprotected (arbiter epoch {})",
                    now.record.epoch
                ))
            }
            Err(lost) => {
                // Never two live copies: this one ends without running another instruction.
                log::error!("{vm}: {lost}; stopping this copy");
                self.s.host.remove_migrated(vm);
                Failure {
                    why: format!("{lost}; this copy is stopped"),
                    source_runs: false,
                }
            }
        }
    }
}
