//! The destination side: a one-shot listener, the handshake checked (MAC first), the VM built
//! while pages stream in, the machine state decoded and checked by the snapshot decoder, and the
//! VM started only on the source's `Go`. Any failure drops the half-built VM and whatever was
//! made for it; the host keeps serving.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_api::control::ControlError;
use lockstep_api::migration::{IncomingInfo, IncomingRequest, MigrationDirection, MigrationPhase};
use lockstep_api::private_fs;
use lockstep_api::VmConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{
    self, expect_frame, open_auth, read_frame, read_u64, reason_bytes, write_frame, AwaitInput,
    Conn, CpuidEntry, Endpoint, Handshake, Kind, ProtocolError, PAGE, SWITCH_SPIN,
};
use super::{spawn_thread, Migration, MigrationHost};
use crate::memory::{self, GuestMemoryMmap};
use crate::vm::incoming::IncomingVm;
use crate::vm::snapshot::{decode_and_check, SnapshotPaths};

/// How long a listener waits for its source.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a listener looks for its source's connection.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write may block once pages flow.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Conn::Unix(s)
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Opens a one-shot listener for a VM to be called `request.name` and returns its token.
pub fn start_incoming(
    host: Arc<dyn MigrationHost>,
    request: IncomingRequest,
) -> Result<IncomingInfo, ControlError> {
    let bad = ControlError::BadRequest;
    let endpoint = Endpoint::parse(&request.listen).map_err(|e| bad(format!("listen: {e}")))?;
    let name = request.name;
    if lockstep_api::config::validate_name(&name).is_err() || name.starts_with('.') {
        return Err(bad(format!("name: {name:?} is not a valid VM name")));
    }
    if host.vm_exists(&name) {
        return Err(ControlError::Conflict(format!(
            "a VM named {name:?} exists already"
        )));
    }
    let (listener, listen) = match &endpoint {
        Endpoint::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .map_err(|e| bad(format!("listen: cannot listen on {addr}: {e}")))?;
            let local = l.local_addr().map_err(|e| bad(e.to_string()))?;
            (Listener::Tcp(l), local.to_string())
        }
        Endpoint::Unix(path) => {
            let l = private_fs::bind_private_socket(path)
                .map_err(|e| bad(format!("listen: {}: {e}", path.display())))?;
            (Listener::Unix(l, path.clone()), endpoint.to_string())
        }
    };
    match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l, _) => l.set_nonblocking(true),
    }
    .map_err(|e| ControlError::Internal(e.to_string()))?;
    let ft = match &request.ft {
        Some(options) => Some(crate::ft::PairOptions::check(options, &name)?),
        None => None,
    };
    let beacon_socket = match &ft {
        Some(ft) => ft.bind_heartbeat_path()?,
        None => None,
    };
    let token = private_fs::random_hex(32).map_err(|e| ControlError::Internal(e.to_string()))?;
    let migration = host.migrations().add(
        MigrationDirection::Incoming,
        &name,
        MigrationPhase::Listening,
    )?;
    let id = migration.info().id;
    let receiver = Receiver {
        host,
        migration,
        name,
        token: token.clone(),
        overrides: super::devices::Overrides {
            nets: request.network_overrides,
            vsock: request.vsock_override,
            drives: request.drive_overrides,
        },
        ft,
        rejoin: Mutex::new(None),
        beacon_socket,
        made_images: Mutex::new(Vec::new()),
    };
    spawn_thread(format!("migrate-in-{id}"), move || {
        let mut receiver = receiver;
        let outcome = receiver.run(listener);
        // Its address is free for a new pairing.
        receiver.beacon_socket = None;
        if let Err(why) = &outcome {
            log::warn!("{}: incoming migration failed: {why}", receiver.name);
        }
        let took_over = outcome.is_ok();
        receiver.migration.finish(outcome);
        // A secondary that took the VM over pairs again: with the old primary after a planned
        // failover (the roles switch), else with the standby if it has one.
        if let (Some(ft), true) = (&receiver.ft, took_over) {
            let rejoin = receiver
                .rejoin
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match rejoin {
                Some(old) => ft.pair_with(
                    receiver.host.clone(),
                    &receiver.name,
                    &old,
                    "the old primary",
                    ft.standby.clone(),
                ),
                None => ft.reprotect(receiver.host.clone(), &receiver.name),
            }
        }
    })
    .map_err(|e| ControlError::Internal(format!("cannot start the listener: {e}")))?;
    Ok(IncomingInfo { id, listen, token })
}

struct Receiver {
    host: Arc<dyn MigrationHost>,
    migration: Arc<Migration>,
    name: String,
    token: String,
    /// This host's taps and vsock socket instead of the source's.
    overrides: super::devices::Overrides,
    /// Stand by as a fault-tolerant secondary instead of taking the VM over.
    ft: Option<crate::ft::PairOptions>,
    /// Where the old primary stands by after a planned failover.
    rejoin: Mutex<Option<lockstep_api::migration::FtStandby>>,
    /// The secondary's end of the pairing's second heartbeat path.
    beacon_socket: Option<std::net::UdpSocket>,
    /// Images this listener made for a secondary's drives, removed if it ends without taking
    /// the VM over.
    made_images: Mutex<Vec<PathBuf>>,
}

/// Guest memory being filled from the stream, with the pages written so far (a `Zero` run over
/// pages never written is nothing to do: fresh memory reads as zeros).
pub(crate) struct Landing<'a> {
    memory: &'a GuestMemoryMmap,
    written: Vec<Vec<u64>>,
}

impl<'a> Landing<'a> {
    /// Nothing written yet: `memory` is fresh (all zeros).
    pub(crate) fn new(memory: &'a GuestMemoryMmap) -> Self {
        Landing {
            memory,
            written: memory
                .iter()
                .map(|r| vec![0u64; (r.len() as usize / PAGE).div_ceil(64)])
                .collect(),
        }
    }

    /// The memory it lands in.
    pub(crate) fn memory(&self) -> &'a GuestMemoryMmap {
        self.memory
    }

    /// Checks a `Pages` or `Zero` frame's payload against guest memory without landing it;
    /// returns the pages it covers.
    pub(crate) fn check(&self, kind: Kind, payload: &[u8]) -> Result<u64, String> {
        let (pfn, count) = match kind {
            Kind::Pages => {
                let pfn = read_u64(payload, 0).ok_or("a Pages frame without its page number")?;
                let data = payload.len() - 8;
                if data == 0 || !data.is_multiple_of(PAGE) {
                    return Err(format!("a Pages frame of {data} bytes of pages"));
                }
                (pfn, (data / PAGE) as u64)
            }
            Kind::Zero => match (read_u64(payload, 0), read_u64(payload, 8), payload.len()) {
                (Some(pfn), Some(count), 16) => (pfn, count),
                _ => return Err("a malformed Zero frame".into()),
            },
            _ => return Err(format!("{kind:?} is not memory")),
        };
        self.locate(pfn, count)?;
        Ok(count)
    }

    /// The region index and first page in it of `count` pages from page number `pfn`, all in
    /// one region; refused otherwise.
    fn locate(&self, pfn: u64, count: u64) -> Result<(usize, usize), String> {
        let bad = || format!("pages {pfn:#x}+{count} are not guest memory");
        let start = pfn.checked_mul(PAGE as u64).ok_or_else(bad)?;
        let len = count.checked_mul(PAGE as u64).ok_or_else(bad)?;
        let end = start.checked_add(len).ok_or_else(bad)?;
        if count == 0 {
            return Err(bad());
        }
        self.memory
            .iter()
            .enumerate()
            .find(|(_, r)| start >= r.start_addr().0 && end <= r.start_addr().0 + r.len())
            .map(|(i, r)| (i, ((start - r.start_addr().0) / PAGE as u64) as usize))
            .ok_or_else(bad)
    }

    fn mark(&mut self, region: usize, first: usize, count: usize, on: bool) {
        for (word, mask) in word_masks(first, count) {
            let word = &mut self.written[region][word];
            if on {
                *word |= mask;
            } else {
                *word &= !mask;
            }
        }
    }

    /// Lands a `Pages` frame's payload; returns the pages written.
    pub(crate) fn pages(&mut self, payload: &[u8]) -> Result<u64, String> {
        let pfn = read_u64(payload, 0).ok_or("a Pages frame without its page number")?;
        let data = &payload[8..];
        if data.is_empty() || !data.len().is_multiple_of(PAGE) {
            return Err(format!("a Pages frame of {} bytes of pages", data.len()));
        }
        let count = (data.len() / PAGE) as u64;
        let (region, first) = self.locate(pfn, count)?;
        self.memory
            .write_slice(data, GuestAddress(pfn * PAGE as u64))
            .map_err(|e| format!("writing pages {pfn:#x}: {e}"))?;
        self.mark(region, first, count as usize, true);
        Ok(count)
    }

    /// Lands a `Zero` frame's payload.
    pub(crate) fn zero(&mut self, payload: &[u8]) -> Result<(), String> {
        let (Some(pfn), Some(count), 16) =
            (read_u64(payload, 0), read_u64(payload, 8), payload.len())
        else {
            return Err("a malformed Zero frame".into());
        };
        let (region, first) = self.locate(pfn, count)?;
        // Word by word: a round 0 of an idle 2 GiB guest is runs over half a million pages,
        // nearly all never written.
        let zeros = [0u8; PAGE];
        for (word, mask) in word_masks(first, count as usize) {
            let mut hit = self.written[region][word] & mask;
            while hit != 0 {
                let page = word * 64 + hit.trailing_zeros() as usize;
                hit &= hit - 1;
                let addr = (pfn + (page - first) as u64) * PAGE as u64;
                self.memory
                    .write_slice(&zeros, GuestAddress(addr))
                    .map_err(|e| e.to_string())?;
            }
        }
        self.mark(region, first, count as usize, false);
        Ok(())
    }
}

/// The bitmap words that pages `first..first + count` fall in, each with the mask of their bits.
fn word_masks(first: usize, count: usize) -> impl Iterator<Item = (usize, u64)> {
    let end = first + count;
    (first / 64..end.div_ceil(64)).map(move |word| {
        let lo = first.max(word * 64) - word * 64;
        let hi = end.min(word * 64 + 64) - word * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (word, mask)
    })
}

/// Reads pre-copy frames into `memory` (pages checked against its regions before any write)
/// until the machine state arrives; returns the state's bytes, and the bytes and pages
/// received. `progress` hears of every round's end (round, bytes, pages). The stream is
/// untrusted: anything but `Pages`, `Zero`, `RoundEnd` or `State` ends it with an error.
pub fn land_pages(
    memory: &GuestMemoryMmap,
    input: &mut impl AwaitInput,
    mut progress: impl FnMut(u32, u64, u64),
) -> Result<(Vec<u8>, u64, u64), String> {
    let mut landing = Landing::new(memory);
    let mut bytes = 0u64;
    let mut pages = 0u64;
    loop {
        // The switch's frames come within a millisecond or so of the last round's.
        input.await_input(SWITCH_SPIN);
        let frame = read_frame(input).map_err(|e| e.to_string())?;
        bytes += 5 + frame.payload.len() as u64;
        match frame.kind {
            Kind::Pages => pages += landing.pages(&frame.payload)?,
            Kind::Zero => landing.zero(&frame.payload)?,
            Kind::RoundEnd => {
                let round = frame
                    .payload
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes)
                    .ok_or("a malformed RoundEnd frame")?;
                progress(round, bytes, pages);
            }
            Kind::State => return Ok((frame.payload, bytes, pages)),
            Kind::Abort => {
                return Err(format!(
                    "the source gave up: {}",
                    protocol::reason_text(&frame.payload)
                ))
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    expected: "pages or the state",
                    got,
                }
                .to_string())
            }
        }
    }
}

/// Decodes and checks a machine state from the stream (as a snapshot state file) for a VM with
/// `memory` whose handshake named `config`.
pub(crate) fn check_state(
    hv: &crate::kvm::Hypervisor,
    memory: &GuestMemoryMmap,
    state: &[u8],
    config: &str,
) -> Result<crate::vm::snapshot::MachineSnapshot, String> {
    let paths = SnapshotPaths {
        state: "migration stream (state)".into(),
        memory: "migration stream (memory)".into(),
    };
    let mem_len = memory::total_bytes(memory);
    let snapshot =
        decode_and_check(&paths, state, mem_len, &hv.host_limits()).map_err(|e| e.to_string())?;
    let sent: serde_json::Value = serde_json::from_str(config).map_err(|e| e.to_string())?;
    if serde_json::to_value(&snapshot.config).ok() != Some(sent) {
        return Err("the state's config is not the one the handshake named".into());
    }
    Ok(snapshot)
}

fn refuse(conn: &mut Conn, why: &str) {
    let _ = write_frame(conn, Kind::Refuse, reason_bytes(why));
}

impl Receiver {
    fn accept(&self, listener: &Listener) -> Result<Conn, String> {
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            match listener.accept() {
                Ok(conn) => return Ok(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accept: {e}")),
            }
            if self.migration.is_cancelled() {
                return Err("cancelled by request".into());
            }
            if Instant::now() > deadline {
                return Err(format!("no source connected within {ACCEPT_TIMEOUT:?}"));
            }
            // The source's connection waits for this look: 20 ms cost a migration 10 ms on
            // average (bench/run.sh migrate), 2 ms costs 1 ms for 500 cheap wake-ups a second.
            std::thread::sleep(ACCEPT_POLL);
        }
    }

    fn run(&self, listener: Listener) -> Result<(), String> {
        let mut conn = self.accept(&listener)?;
        // One-shot: the listener closes (and its socket file goes) once a source connected.
        drop(listener);
        self.migration.set_conn(conn.try_clone().ok());
        let result = self.receive(&mut conn);
        if let Err(why) = &result {
            let _ = write_frame(&mut conn, Kind::Abort, reason_bytes(why));
        }
        result
    }

    /// Checks the handshake; on success returns the config placed for this host. On the same
    /// host (`local`) another lockstep version may send (a VMM upgrade): the format version,
    /// the config and, at the switch, the state decoder decide.
    fn check_handshake(&self, handshake: &Handshake, local: bool) -> Result<VmConfig, String> {
        match (&handshake.ft, &self.ft) {
            (Some(_), None) => {
                return Err(
                    "the source pairs the VM for fault tolerance; this listener takes a VM over (open it with \"ft\")".into(),
                )
            }
            (None, Some(_)) => {
                return Err(
                    "this listener waits for a fault-tolerant pairing; the source moves the VM"
                        .into(),
                )
            }
            _ => {}
        }
        if handshake.format != protocol::FORMAT_VERSION {
            return Err(format!(
                "the stream is format version {}; this lockstep speaks {}",
                handshake.format,
                protocol::FORMAT_VERSION
            ));
        }
        let ours = env!("CARGO_PKG_VERSION");
        if handshake.lockstep_version != ours && !local {
            return Err(format!(
                "the source runs lockstep {}, this host {ours}",
                handshake.lockstep_version
            ));
        }
        let hv = self.host.hypervisor();
        let mut config =
            VmConfig::from_json(&handshake.config).map_err(|e| format!("the VM's config: {e}"))?;
        self.overrides.apply(&mut config)?;
        if let Some(hello) = &handshake.ft {
            let made = self
                .overrides
                .create_missing_images(&config, &hello.drive_sizes)?;
            *self.made_images.lock().unwrap_or_else(|p| p.into_inner()) = made;
        }
        // On the same host the vsock listener comes along: its socket file exists.
        let vsock_handed = local && config.vsock.is_some();
        crate::vm::incoming::validate(&config, &hv.host_limits(), vsock_handed)
            .map_err(|e| format!("the VM's config does not fit this host: {e}"))?;
        let regions: Vec<(u64, u64)> = memory::ram_ranges(config.machine_config.mem_size_mib << 20)
            .into_iter()
            .map(|(a, l)| (a.0, l))
            .collect();
        if handshake.regions != regions {
            return Err("the VM's memory regions are not what its config gives here".into());
        }
        let supported: Vec<CpuidEntry> = hv
            .supported_cpuid()
            .as_slice()
            .iter()
            .map(CpuidEntry::from)
            .collect();
        protocol::cpuid_compatible(&handshake.cpuid, &supported)?;
        if self.host.vm_exists(&self.name) {
            return Err(format!("a VM named {:?} exists already", self.name));
        }
        self.host.place_incoming(&self.name, &mut config, local)?;
        Ok(config)
    }

    fn receive(&self, conn: &mut Conn) -> Result<(), String> {
        conn.set_timeouts(HANDSHAKE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        self.migration.set_phase(MigrationPhase::Handshake);
        let nonce = private_fs::random_hex(protocol::NONCE_BYTES / 2)
            .map_err(|e| e.to_string())?
            .into_bytes();
        write_frame(conn, Kind::Hello, &nonce).map_err(|e| e.to_string())?;
        let auth = expect_frame(conn, Kind::Auth, "Auth").map_err(|e| e.to_string())?;
        let handshake = match open_auth(&self.token, &nonce, &auth) {
            Ok(h) => h,
            Err(e) => {
                let why = e.to_string();
                refuse(conn, &why);
                return Err(why);
            }
        };
        let local = self.same_host(conn, &handshake);
        let config = match self.check_handshake(&handshake, local) {
            Ok(c) => c,
            Err(why) => {
                self.remove_made_images();
                refuse(conn, &why);
                return Err(format!("refused: {why}"));
            }
        };
        // From here, a failure removes what place_incoming made. A secondary that took the VM
        // over returns Ok: the images it made are the VM's now.
        let result = self.receive_vm(conn, &handshake, config, local);
        if result.is_err() {
            self.host.forget_incoming(&self.name);
            self.remove_made_images();
        }
        result
    }

    fn remove_made_images(&self) {
        super::devices::remove_images(
            &mut self.made_images.lock().unwrap_or_else(|p| p.into_inner()),
        );
    }

    /// Whether to take the same-host path a source offered (see `local`).
    fn same_host(&self, conn: &Conn, handshake: &Handshake) -> bool {
        if !handshake.same_host || self.ft.is_some() {
            return false;
        }
        if !self.overrides.is_empty() {
            // The listener named taps or a vsock socket of its own: the source's cannot come.
            log::info!(
                "{}: memory will be copied: the listener overrides taps or the vsock socket",
                self.name
            );
            return false;
        }
        match super::local::check_peer(conn) {
            Ok(()) => true,
            Err(why) => {
                log::info!("{}: memory will be copied: {why}", self.name);
                false
            }
        }
    }

    fn receive_vm(
        &self,
        conn: &mut Conn,
        handshake: &Handshake,
        config: VmConfig,
        local: bool,
    ) -> Result<(), String> {
        let hv = self.host.hypervisor();
        let handed = match local {
            true => {
                // A source that offers its open connections gets a second 1: take them.
                let answer: &[u8] = if handshake.connections { &[1, 1] } else { &[1] };
                write_frame(conn, Kind::Accept, answer).map_err(|e| e.to_string())?;
                let taps = config.network_interfaces.len();
                let vsock = config.vsock.is_some();
                Some(
                    super::local::receive_memory(conn, &handshake.regions, taps, vsock)
                        .map_err(|e| e.to_string())?,
                )
            }
            false => None,
        };
        let incoming = match IncomingVm::prepare(hv, &config, handed) {
            Ok(vm) => vm,
            Err(e) => {
                let why = format!("cannot build the VM here: {e}");
                refuse(conn, &why);
                return Err(why);
            }
        };
        write_frame(conn, Kind::Accept, &[]).map_err(|e| e.to_string())?;
        conn.set_timeouts(IO_TIMEOUT).map_err(|e| e.to_string())?;
        self.migration.set_phase(MigrationPhase::Precopy);
        if let (Some(hello), Some(ft)) = (&handshake.ft, &self.ft) {
            let standby = crate::ft::secondary::Standby {
                host: &self.host,
                migration: &self.migration,
                name: &self.name,
                hello,
                options: ft,
                handshake_config: &handshake.config,
                rejoin: &self.rejoin,
                token: &self.token,
                beacon_socket: self.beacon_socket.as_ref(),
            };
            return standby.run(conn, incoming);
        }
        let progress = |round: u32, bytes: u64, pages: u64| {
            self.migration.update(|i| {
                i.round = round;
                i.bytes = bytes;
                i.pages = pages;
            })
        };
        let (state, bytes, pages) = land_pages(incoming.memory(), conn, progress)?;
        let mut incoming = incoming;
        if local && handshake.connections {
            let handed = super::connections::receive_connections(conn, incoming.has_vsock())
                .map_err(|e| e.to_string())?;
            incoming.adopt_connections(handed);
        }
        self.migration.set_phase(MigrationPhase::Switching);
        let switch = Instant::now();
        self.migration.update(|i| {
            i.bytes = bytes;
            i.pages = pages;
        });
        let snapshot = check_state(hv, incoming.memory(), &state, &handshake.config)?;
        // The CPUID was checked at the handshake (what the source configured its vCPUs with):
        // the vCPUs' saved CPUID is not a reliable witness, as PVM reads host bits back.
        // `created` (the new serial log) is removed on any failure before the VM runs here.
        let (vm, created) = incoming.finish(&snapshot).map_err(|e| e.to_string())?;
        if self.host.vm_exists(&self.name) {
            return Err(format!("a VM named {:?} exists already", self.name));
        }
        write_frame(conn, Kind::Ready, &[]).map_err(|e| e.to_string())?;
        log::debug!("{}: state loaded in {:?}", self.name, switch.elapsed());
        // The VM starts only on Go; anything else drops it.
        conn.await_input(SWITCH_SPIN);
        let go = expect_frame(conn, Kind::Go, "Go").map_err(|e| e.to_string())?;
        let paused = match go.as_slice() {
            [1] => false,
            [0] => true,
            _ => return Err("a malformed Go frame".into()),
        };
        vm.own_passed_sockets();
        if local {
            if let Some(path) = &vm.config().serial.console_socket {
                // A takeover: the source's console socket is in the way (its client came along).
                super::local::clear_console_socket(path);
            }
        }
        let announcers = super::devices::announcers(&self.name, vm.devices());
        self.host.adopt(&self.name, vm, paused)?;
        created.keep();
        if let Err(e) = write_frame(conn, Kind::Running, &[]) {
            log::warn!("{}: running, but the source was not told: {e}", self.name);
        }
        super::devices::announce(&self.name, announcers);
        log::info!(
            "{}: arrived by live migration (state to running in {:?})",
            self.name,
            switch.elapsed()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_frame(pfn: u64, fill: &[u8]) -> Vec<u8> {
        let mut payload = pfn.to_le_bytes().to_vec();
        for &b in fill {
            payload.extend_from_slice(&[b; PAGE]);
        }
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Pages, &payload).unwrap();
        out
    }

    fn zero_frame(pfn: u64, count: u64) -> Vec<u8> {
        let mut payload = pfn.to_le_bytes().to_vec();
        payload.extend_from_slice(&count.to_le_bytes());
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Zero, &payload).unwrap();
        out
    }

    fn state_frame() -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::State, b"state").unwrap();
        out
    }

    #[test]
    fn pages_and_zero_runs_land_where_they_say() {
        let mem = memory::create_guest_memory(1 << 20, false).unwrap();
        let mut stream = pages_frame(2, &[7, 8]);
        stream.extend(zero_frame(3, 1));
        stream.extend(zero_frame(10, 50));
        stream.extend(state_frame());
        let (state, _, pages) = land_pages(&mem, &mut &stream[..], |_, _, _| {}).unwrap();
        assert_eq!((state.as_slice(), pages), (&b"state"[..], 2));
        let byte = |addr: u64| mem.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(byte(2 * 4096 + 100), 7);
        assert_eq!(byte(3 * 4096 + 100), 0, "a page zeroed after it was sent");
    }

    #[test]
    fn zero_runs_across_bitmap_words_clear_exactly_the_pages_sent_before() {
        let mem = memory::create_guest_memory(1 << 20, false).unwrap();
        // Pages 60..70 and 130 hold data; a run over 62..131 zeroes 62..70 and 130 only.
        let mut stream = pages_frame(60, &[5; 10]);
        stream.extend(pages_frame(130, &[6]));
        stream.extend(zero_frame(62, 69));
        stream.extend(state_frame());
        land_pages(&mem, &mut &stream[..], |_, _, _| {}).unwrap();
        let byte = |page: u64| mem.read_obj::<u8>(GuestAddress(page * 4096 + 9)).unwrap();
        assert_eq!((byte(60), byte(61)), (5, 5));
        assert!((62..=131).all(|p| byte(p) == 0));
    }

    #[test]
    fn word_masks_cover_a_range_bit_for_bit() {
        for (first, count) in [(0, 1), (0, 64), (3, 61), (63, 2), (5, 200), (64, 128)] {
            let mut bits = vec![0u64; 8];
            for (word, mask) in word_masks(first, count) {
                assert_eq!(bits[word] & mask, 0, "words overlap");
                bits[word] |= mask;
            }
            let want: Vec<u64> = (0..8)
                .map(|w| {
                    (0..64)
                        .filter(|b| (first..first + count).contains(&(w * 64 + b)))
                        .fold(0, |m, b| m | 1 << b)
                })
                .collect();
            assert_eq!(bits, want, "{first}+{count}");
        }
    }

    #[test]
    fn pages_outside_memory_and_cut_streams_are_refused() {
        let mem = memory::create_guest_memory(1 << 20, false).unwrap();
        for stream in [
            pages_frame(256, &[1]),
            pages_frame(255, &[1, 1]),
            pages_frame(u64::MAX / 2, &[1]),
            zero_frame(0, 257),
            zero_frame(u64::MAX, 2),
            zero_frame(1, 0),
            pages_frame(1, &[1])[..100].to_vec(),
            vec![Kind::Go as u8, 1, 0, 0, 0, 1],
            Vec::new(),
        ] {
            assert!(land_pages(&mem, &mut &stream[..], |_, _, _| {}).is_err());
        }
    }
}
