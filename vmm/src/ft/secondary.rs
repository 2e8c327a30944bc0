//! The secondary of a pair: the VM is built (KVM VM, memory, devices, vCPUs) but never runs
//! while the primary lives. The full copy lands in guest memory as a migration's does; from the
//! first checkpoint on, each epoch's pages are checked and staged, and applied only when the
//! epoch's `Checkpoint` frame (its machine state, decoded and checked first) has come whole: a
//! half-received epoch is never applied. Each applied checkpoint is acknowledged. When the
//! primary goes silent for the heartbeat timeout (or its connection breaks), the secondary asks
//! the arbiter to make it live, and if it wins, starts the VM from the last applied checkpoint
//! and announces the guest's MAC addresses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_api::migration::{FtRedundancy, FtStandby, FtStatus, MigrationPhase};

use super::arbiter::{Arbiter, ArbiterConfig, ArbiterError, Observed};
use super::beacon::{Beacon, BeaconKey, Role};
use super::{PairOptions, Pauses};
use crate::memory;
use crate::migration::protocol::{
    read_frame, read_u64, reason_text, write_frame, Conn, FtHello, Kind, ProtocolError,
};
use crate::migration::receive::{check_state, Landing};
use crate::migration::{spawn_thread, Migration, MigrationHost};
use crate::vm::incoming::IncomingVm;
use lockstep_devices::virtio::block::ReplicaWriter;

/// How long the full copy may pause between frames before the primary counts as gone.
const COPY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new primary waits, after a planned failover, for the old one to say where it
/// stands by.
const REJOIN_WAIT: Duration = Duration::from_secs(10);

/// The most bytes of disk blocks one epoch may stage, per drive.
const DISK_EPOCH_LIMIT: usize = 512 << 20;

/// A secondary standing by.
pub(crate) struct Standby<'a> {
    /// The host that runs the VM if it takes over.
    pub host: &'a Arc<dyn MigrationHost>,
    /// The pairing's record on this host.
    pub migration: &'a Arc<Migration>,
    /// The VM's name here.
    pub name: &'a str,
    /// What the primary said of the pair.
    pub hello: &'a FtHello,
    /// This side's options.
    pub options: &'a PairOptions,
    /// The VM's config as the handshake sent it (every state must name it).
    pub handshake_config: &'a str,
    /// After a planned failover: the old primary's listener, where this side pairs again as
    /// the primary (the roles switched).
    pub rejoin: &'a Mutex<Option<FtStandby>>,
    /// The pairing's token (the second heartbeat path's key).
    pub token: &'a str,
    /// This side's end of the second heartbeat path, if it has one.
    pub beacon_socket: Option<&'a std::net::UdpSocket>,
}

/// How the stream from the primary ended.
enum End {
    /// Silence or a broken connection: the primary may be gone.
    Silence(String),
    /// The primary ended the pairing.
    Unpaired(String),
    /// The stream broke its rules: the pairing ends, nobody takes over.
    Broken(String),
    /// A planned failover: the checkpoint applied last is the primary's last.
    Failover,
}

/// The staged frames of an epoch under way, bounded by the guest's memory.
struct Staged {
    frames: Vec<(Kind, Vec<u8>)>,
    bytes: u64,
    limit: u64,
}

/// This host's copies of the VM's drives (its own images, by config index), opened as the
/// primary's full copy of each begins.
struct Replicas {
    paths: Vec<std::path::PathBuf>,
    open: Vec<Option<ReplicaWriter>>,
}

impl Replicas {
    fn new(incoming: &IncomingVm) -> Replicas {
        let paths: Vec<_> = incoming
            .config()
            .drives
            .iter()
            .map(|d| d.path_on_host.clone())
            .collect();
        let open = paths.iter().map(|_| None).collect();
        Replicas { paths, open }
    }

    /// The drive index and the rest of a disk frame's payload.
    fn split(payload: &[u8]) -> Result<(usize, &[u8]), String> {
        let index = payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or("a disk frame without its drive")?;
        Ok((index as usize, &payload[4..]))
    }

    fn writer(&mut self, index: usize) -> Result<&mut ReplicaWriter, String> {
        self.open
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("drive {index} has no copy under way"))
    }

    /// `DiskBegin`: the replica must be the primary's size already (its virtio device was
    /// built on it); it is emptied for the copy.
    fn begin(&mut self, payload: &[u8]) -> Result<(), String> {
        let (index, rest) = Self::split(payload)?;
        let path = self
            .paths
            .get(index)
            .ok_or_else(|| format!("the VM has no drive {index}"))?;
        let size = read_u64(rest, 0).ok_or("a DiskBegin frame without its size")?;
        let mut replica = ReplicaWriter::open(path, DISK_EPOCH_LIMIT)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if replica.size() != size {
            return Err(format!(
                "{} is {} bytes; the primary's image is {size}: make it the same size",
                path.display(),
                replica.size()
            ));
        }
        replica
            .begin_full_copy(size)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.open[index] = Some(replica);
        Ok(())
    }

    fn chunk(&mut self, payload: &[u8]) -> Result<(), String> {
        let (index, rest) = Self::split(payload)?;
        let offset = read_u64(rest, 0).ok_or("a DiskChunk frame without its offset")?;
        self.writer(index)?
            .write_chunk(offset, &rest[8..])
            .map_err(|e| e.to_string())
    }

    fn stage(&mut self, payload: &[u8]) -> Result<(), String> {
        let (index, rest) = Self::split(payload)?;
        let block = read_u64(rest, 0).ok_or("a DiskBlock frame without its block")?;
        self.writer(index)?
            .stage(block, &rest[8..])
            .map_err(|e| e.to_string())
    }

    /// Writes every replica's staged blocks and makes them durable.
    fn commit(&mut self) -> Result<(), String> {
        for replica in self.open.iter_mut().flatten() {
            replica.commit().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Drops a half-received epoch's blocks.
    fn discard(&mut self) {
        for replica in self.open.iter_mut().flatten() {
            replica.discard();
        }
    }
}

impl Standby<'_> {
    /// Stands by until the pairing ends; `Ok` once this side has taken over and runs the VM.
    pub(crate) fn run(&self, conn: &mut Conn, incoming: IncomingVm) -> Result<(), String> {
        let writer = Arc::new(Mutex::new(conn.try_clone().map_err(|e| e.to_string())?));
        let stop = Arc::new(AtomicBool::new(false));
        let beats = {
            let (writer, stop) = (writer.clone(), stop.clone());
            let every = self.options.heartbeat();
            spawn_thread(format!("ft-beat-{}", self.name), move || {
                while !stop.load(Ordering::SeqCst) {
                    // Unparked when the stream ends: a takeover does not wait out the interval.
                    std::thread::park_timeout(every);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if write_frame(&mut *conn, Kind::Heartbeat, &[]).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| e.to_string())?
        };
        let beacon = self.start_beacon();
        let mut applied: Option<(u64, Vec<u8>)> = None;
        let mut replicas = Replicas::new(&incoming);
        let mut known = None;
        let end = self.follow(
            conn,
            &incoming,
            &writer,
            &mut applied,
            &mut replicas,
            &mut known,
        );
        // Whatever happens next, this side no longer holds an up-to-date copy; a takeover
        // makes it the degraded primary.
        self.migration.update(|i| {
            if let Some(ft) = i.ft.as_mut() {
                ft.redundancy = FtRedundancy::Lost;
            }
        });
        // A half-received epoch's disk blocks are never written.
        replicas.discard();
        drop(replicas);
        stop.store(true, Ordering::SeqCst);
        beats.thread().unpark();
        let _ = beats.join();
        match end {
            End::Unpaired(why) => {
                self.migration.mark_cancelled();
                Err(format!("the primary ended the pairing: {why}"))
            }
            End::Broken(why) => {
                let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
                let _ = write_frame(&mut *conn, Kind::Abort, why.as_bytes());
                Err(why)
            }
            End::Failover => {
                let Some((epoch, state)) = applied else {
                    return Err("a failover before any checkpoint".into());
                };
                let outcome = self.take_over(incoming, epoch, &state, known, "a planned failover");
                {
                    let mut out = writer.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = match &outcome {
                        Ok(()) => write_frame(&mut *out, Kind::Running, &[]),
                        Err(why) => write_frame(&mut *out, Kind::Abort, why.as_bytes()),
                    };
                }
                if outcome.is_ok() {
                    self.await_rejoin(conn);
                }
                outcome
            }
            End::Silence(_) if self.migration.is_cancelled() => Err("cancelled by request".into()),
            End::Silence(why)
                if beacon
                    .as_ref()
                    .is_some_and(|b| b.heard_within(self.options.timeout)) =>
            {
                Err(format!(
                    "the replication connection failed ({why}) but the primary still answers on the second heartbeat path: not taking over"
                ))
            }
            End::Silence(why) => match applied {
                None => Err(format!(
                    "the primary went before its first checkpoint ({why}): nothing to take over"
                )),
                Some((epoch, state)) => self.take_over(incoming, epoch, &state, known, &why),
            },
        }
    }

    /// Reads the primary's stream until it ends, keeping `applied` (the last checkpoint
    /// applied, and its machine state) up to date. Once the first checkpoint is applied,
    /// `known` is the arbiter's record naming the primary live: a takeover must replace that
    /// very record.
    fn follow(
        &self,
        conn: &mut Conn,
        incoming: &IncomingVm,
        writer: &Mutex<Conn>,
        applied: &mut Option<(u64, Vec<u8>)>,
        replicas: &mut Replicas,
        known: &mut Option<Observed>,
    ) -> End {
        let mem = incoming.memory();
        let mut landing = Landing::new(mem);
        let mut staged = Staged {
            frames: Vec::new(),
            bytes: 0,
            // An epoch sends each page at most once.
            limit: memory::total_bytes(mem) + (1 << 20),
        };
        if let Err(e) = conn.set_read_timeout(COPY_TIMEOUT) {
            return End::Broken(e.to_string());
        }
        let mut pauses = Pauses::default();
        let mut received = 0u64;
        let mut window = (Instant::now(), 0u64);
        loop {
            let frame = match read_frame(conn) {
                Ok(frame) => frame,
                // Silence, or a connection that ended: the primary may be gone.
                Err(e @ (ProtocolError::Io(_) | ProtocolError::Truncated(_))) => {
                    return End::Silence(e.to_string())
                }
                // A stream that breaks the protocol ends the pairing; nobody takes over.
                Err(e) => return End::Broken(e.to_string()),
            };
            received += 5 + frame.payload.len() as u64;
            let result = match frame.kind {
                Kind::Pages | Kind::Zero if applied.is_none() => match frame.kind {
                    // The full copy lands at once: no state runs on it yet.
                    Kind::Pages => landing.pages(&frame.payload).map(|_| ()),
                    _ => landing.zero(&frame.payload),
                },
                Kind::Pages | Kind::Zero => staged.add(&landing, frame.kind, frame.payload),
                Kind::DiskBegin if applied.is_none() => replicas.begin(&frame.payload),
                Kind::DiskChunk if applied.is_none() => replicas.chunk(&frame.payload),
                Kind::DiskBlock => replicas.stage(&frame.payload),
                Kind::RoundEnd | Kind::Heartbeat => Ok(()),
                Kind::Checkpoint => {
                    let applying = Instant::now();
                    let done = self
                        .apply(&mut landing, &mut staged, frame.payload, applied)
                        .and_then(|()| replicas.commit());
                    pauses.add(applying.elapsed());
                    done
                }
                Kind::Abort => return End::Unpaired(reason_text(&frame.payload)),
                Kind::Failover if applied.is_some() && staged.frames.is_empty() => {
                    return End::Failover
                }
                other => Err(format!("the primary sent {other:?} while paired")),
            };
            if let Err(why) = result {
                return End::Broken(why);
            }
            if frame.kind != Kind::Checkpoint {
                continue;
            }
            let Some((epoch, _)) = applied.as_ref() else {
                continue;
            };
            let ack = {
                let mut out = writer.lock().unwrap_or_else(|p| p.into_inner());
                // With this side's heartbeat timeout: how long after this the primary may still
                // release the epoch's output without asking the arbiter.
                let mut payload = epoch.to_le_bytes().to_vec();
                payload.extend_from_slice(&(self.options.timeout.as_millis() as u64).to_le_bytes());
                write_frame(&mut *out, Kind::Ack, &payload)
            };
            if let Err(e) = ack {
                return End::Silence(format!("acknowledging {epoch}: {e}"));
            }
            if *epoch == 0 {
                match self.primary_record() {
                    Ok(seen) => *known = Some(seen),
                    Err(why) => return End::Broken(why),
                }
                self.migration.set_phase(MigrationPhase::Standby);
                if let Err(e) = conn.set_read_timeout(self.options.timeout) {
                    return End::Broken(e.to_string());
                }
                log::info!(
                    "{}: standing by as the secondary of pair {:?}",
                    self.name,
                    self.hello.pair
                );
            }
            let rate = (received - window.1) as f64 / window.0.elapsed().as_secs_f64().max(1e-3);
            if window.0.elapsed() > Duration::from_secs(1) {
                window = (Instant::now(), received);
            }
            let status = FtStatus {
                role: "secondary".into(),
                pair: self.hello.pair.clone(),
                epoch: epoch + 1,
                committed_epoch: Some(*epoch),
                since_commit_ms: Some(0.0),
                pause_p50_ms: pauses.quantile(0.5),
                pause_p99_ms: pauses.quantile(0.99),
                replication_mib_s: rate / (1 << 20) as f64,
                arbiter_epoch: 0,
                redundancy: FtRedundancy::Full,
            };
            self.migration.update(|i| {
                i.bytes = received;
                i.ft = Some(status);
            });
        }
    }

    /// Starts the second heartbeat path when both sides have one.
    fn start_beacon(&self) -> Option<Beacon> {
        let (socket, primary) = match (self.beacon_socket, &self.hello.heartbeat) {
            (None, None) => return None,
            (Some(socket), Some(primary)) => (socket, primary),
            (mine, _) => {
                log::warn!(
                    "{}: only {} has a second heartbeat path: not used",
                    self.name,
                    if mine.is_some() {
                        "this side"
                    } else {
                        "the primary"
                    }
                );
                return None;
            }
        };
        let key = BeaconKey {
            token: self.token.to_string(),
            pair: self.hello.pair.clone(),
        };
        let started = primary
            .parse()
            .map_err(|_| format!("the primary's address {primary:?}"))
            .and_then(|to| {
                Beacon::start(
                    socket,
                    Role::Secondary,
                    Some(to),
                    key,
                    self.options.heartbeat(),
                )
                .map_err(|e| e.to_string())
            });
        match started {
            Ok(beacon) => Some(beacon),
            Err(e) => {
                log::warn!("{}: the second heartbeat path: {e}", self.name);
                None
            }
        }
    }

    /// After a planned failover: the old primary says where it stands by to become this side's
    /// secondary. Without a word from it, the VM runs on here unprotected.
    fn await_rejoin(&self, conn: &mut Conn) {
        let heard = conn
            .set_read_timeout(REJOIN_WAIT)
            .map_err(|e| e.to_string())
            .and_then(|()| read_frame(conn).map_err(|e| e.to_string()))
            .and_then(|frame| match frame.kind {
                Kind::Rejoin => serde_json::from_slice::<FtStandby>(&frame.payload)
                    .map_err(|e| format!("a malformed Rejoin frame: {e}")),
                Kind::Abort => Err(reason_text(&frame.payload)),
                other => Err(format!("it sent {other:?}")),
            })
            .and_then(|listener| {
                match crate::migration::protocol::Endpoint::parse(&listener.destination) {
                    Ok(crate::migration::protocol::Endpoint::Tcp(_))
                        if !listener.token.is_empty() =>
                    {
                        Ok(listener)
                    }
                    _ => Err(format!("a Rejoin frame naming {:?}", listener.destination)),
                }
            });
        match heard {
            Ok(listener) => {
                *self.rejoin.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
            }
            Err(why) => log::warn!(
                "{}: the old primary will not be the secondary ({why}); running unprotected",
                self.name
            ),
        }
    }

    /// Applies a whole epoch: its state is checked first, then its staged pages land.
    fn apply(
        &self,
        landing: &mut Landing,
        staged: &mut Staged,
        payload: Vec<u8>,
        applied: &mut Option<(u64, Vec<u8>)>,
    ) -> Result<(), String> {
        let epoch = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or("a Checkpoint frame without its epoch")?;
        let expected = applied.as_ref().map_or(0, |(e, _)| e + 1);
        if epoch != expected {
            return Err(format!("checkpoint {epoch} came where {expected} was due"));
        }
        let state = payload[8..].to_vec();
        let hv = self.host.hypervisor();
        check_state(hv, landing.memory(), &state, self.handshake_config)
            .map_err(|e| format!("checkpoint {epoch}: {e}"))?;
        for (kind, payload) in staged.frames.drain(..) {
            match kind {
                Kind::Pages => landing.pages(&payload).map(|_| ())?,
                _ => landing.zero(&payload)?,
            }
        }
        staged.bytes = 0;
        *applied = Some((epoch, state));
        Ok(())
    }

    /// The arbiter's record of the pair, which must name the primary live (it claimed the pair
    /// before its full copy).
    fn primary_record(&self) -> Result<Observed, String> {
        let pair = &self.hello.pair;
        let arbiter = Arbiter::new(ArbiterConfig::new(self.options.arbiter.clone()));
        match arbiter.read(pair) {
            Ok(Some(seen)) if seen.record.live == self.hello.primary => Ok(seen),
            Ok(Some(seen)) => Err(format!(
                "the arbiter names {} live for pair {pair:?}, not the primary {}",
                seen.record.live, self.hello.primary
            )),
            Ok(None) => Err(format!("pair {pair:?} has no record in the arbiter")),
            Err(e) => Err(format!("the arbiter: {e}")),
        }
    }

    /// The primary is silent: this side goes live if the arbiter says so. The claim replaces
    /// only the record `known` when standing by: if the primary has claimed the pair again
    /// since (it lost this side and runs on alone), this side must not take over.
    fn take_over(
        &self,
        incoming: IncomingVm,
        epoch: u64,
        state: &[u8],
        known: Option<Observed>,
        why: &str,
    ) -> Result<(), String> {
        let (pair, me) = (&self.hello.pair, &self.options.host_id);
        log::warn!("{}: taking over ({why}); asking the arbiter", self.name);
        let seen = known.ok_or("no arbiter record known; not taking over")?;
        let arbiter = Arbiter::new(ArbiterConfig::new(self.options.arbiter.clone()));
        let won = match arbiter.claim(pair, me, Some(&seen)) {
            Ok(now) => now,
            Err(ArbiterError::Lost { winner, epoch, .. }) => {
                return Err(format!(
                    "{winner} holds pair {pair:?} (arbiter epoch {epoch}); not taking over"
                ))
            }
            // The claim's outcome is unknown: the record says whether it won.
            Err(e) => match arbiter.read(pair) {
                Ok(Some(now))
                    if now.record.live == *me && now.record.epoch == seen.record.epoch + 1 =>
                {
                    now
                }
                _ => return Err(format!("the arbiter: {e}; not taking over")),
            },
        };
        let hv = self.host.hypervisor();
        let snapshot = check_state(hv, incoming.memory(), state, self.handshake_config)?;
        let (vm, created) = incoming.finish(&snapshot).map_err(|e| e.to_string())?;
        if self.host.vm_exists(self.name) {
            return Err(format!("a VM named {:?} exists already", self.name));
        }
        vm.own_passed_sockets();
        let announcers = crate::migration::devices::announcers(self.name, vm.devices());
        self.host.adopt(self.name, vm, false)?;
        created.keep();
        crate::migration::devices::announce(self.name, announcers);
        log::warn!(
            "{}: took over pair {pair:?} from {} at checkpoint {epoch} (arbiter epoch {})",
            self.name,
            self.hello.primary,
            won.record.epoch
        );
        self.migration.update(|i| {
            if let Some(ft) = i.ft.as_mut() {
                ft.role = "primary (took over)".into();
                ft.arbiter_epoch = won.record.epoch;
                ft.redundancy = FtRedundancy::Degraded;
            }
        });
        Ok(())
    }
}

impl Staged {
    fn add(&mut self, landing: &Landing, kind: Kind, payload: Vec<u8>) -> Result<(), String> {
        landing.check(kind, &payload)?;
        self.bytes += payload.len() as u64;
        if self.bytes > self.limit {
            return Err(format!(
                "an epoch of more than {} bytes: more than the guest's memory",
                self.limit
            ));
        }
        self.frames.push((kind, payload));
        Ok(())
    }
}
