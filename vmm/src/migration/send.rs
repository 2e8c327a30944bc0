//! The source side: handshake, pre-copy rounds from KVM's dirty log and vm-memory's bitmap, the
//! switch. Any failure before `Go` resumes the VM (if it was running) and reports why; after
//! `Go` the VM is never resumed here.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_api::control::ControlError;
use lockstep_api::migration::{MigrateRequest, MigrationDirection, MigrationInfo, MigrationPhase};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::{count, Bits, DirtyLog};
use super::protocol::{
    self, expect_frame, write_frame, AwaitInput, Conn, CpuidEntry, Endpoint, Handshake, Kind, PAGE,
    SWITCH_SPIN,
};
use super::{spawn_thread, Migration, MigrationHost};
use crate::vm::{MigrationAccess, RunState, VmCommand, VmReply};
use crate::x86_64::cpuid::{vcpu_cpuid, CpuTopology};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write on the stream may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the VM's owner thread may take to pause, resume or hand out its state.
const VM_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_DOWNTIME_MS: u64 = 60_000;
const MAX_TIMEOUT_S: u64 = 86_400;

/// Checks a request and starts sending `vm`; the migration runs on its own thread.
pub fn start_outgoing(
    host: Arc<dyn MigrationHost>,
    vm: &str,
    request: MigrateRequest,
) -> Result<MigrationInfo, ControlError> {
    let endpoint = Endpoint::parse(&request.destination)
        .map_err(|e| ControlError::BadRequest(format!("destination: {e}")))?;
    let downtime_ms = request.downtime_ms.unwrap_or(20);
    if !(1..=MAX_DOWNTIME_MS).contains(&downtime_ms) {
        return Err(ControlError::BadRequest(format!(
            "downtime_ms: {downtime_ms} is not within 1..={MAX_DOWNTIME_MS}"
        )));
    }
    let timeout_s = request.timeout_s.unwrap_or(60);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
        return Err(ControlError::BadRequest(format!(
            "timeout_s: {timeout_s} is not within 1..={MAX_TIMEOUT_S}"
        )));
    }
    if request.max_bandwidth_mib_s == Some(0) {
        return Err(ControlError::BadRequest(
            "max_bandwidth_mib_s: 0 would never send".into(),
        ));
    }
    if request.token.is_empty() {
        return Err(ControlError::BadRequest("token: empty".into()));
    }
    let ft = match &request.ft {
        Some(options) => Some(crate::ft::PairOptions::check(options, vm)?),
        None => None,
    };
    host.running_config(vm)?;
    let beacon_socket = match &ft {
        Some(ft) => ft.bind_heartbeat_path()?,
        None => None,
    };
    let migration =
        host.migrations()
            .add(MigrationDirection::Outgoing, vm, MigrationPhase::Handshake)?;
    let info = migration.info();
    let sender = Sender {
        host,
        migration: migration.clone(),
        vm: vm.to_string(),
        endpoint,
        token: request.token,
        downtime: Duration::from_millis(downtime_ms),
        timeout: Duration::from_secs(timeout_s),
        bandwidth: request
            .max_bandwidth_mib_s
            .map(|m| m.saturating_mul(1 << 20)),
        auto_converge: request.auto_converge,
        // A secondary keeps its own copy of memory.
        share_memory: ft.is_none() && request.share_memory.unwrap_or(true),
        ft,
        beacon_socket,
    };
    spawn_thread(format!("migrate-out-{}", info.id), move || {
        let mut sender = sender;
        let outcome = sender.run().map_err(Failure::text);
        // Its address is free for a new pairing.
        sender.beacon_socket = None;
        if let Err(why) = &outcome {
            log::warn!("{}: migration {} failed: {why}", sender.vm, info.id);
        }
        sender.migration.finish(outcome);
        // A primary left alone with its VM pairs again, with the standby if it has one.
        let alone = sender.migration.info().ft.map(|ft| ft.redundancy)
            == Some(lockstep_api::migration::FtRedundancy::Degraded);
        if let (Some(ft), true) = (&sender.ft, alone && !sender.migration.is_cancelled()) {
            ft.reprotect(sender.host.clone(), &sender.vm);
        }
    })
    .map_err(|e| ControlError::Internal(format!("cannot start the migration: {e}")))?;
    Ok(migration.info())
}

/// Why a migration failed, and whether the VM runs on here (always, before `Go`).
pub(crate) struct Failure {
    pub(crate) why: String,
    pub(crate) source_runs: bool,
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure {
            why,
            source_runs: true,
        }
    }
}

impl From<&str> for Failure {
    fn from(why: &str) -> Failure {
        Failure::from(why.to_string())
    }
}

impl Failure {
    fn text(self) -> String {
        if self.source_runs {
            format!("{}; the VM runs on here", self.why)
        } else {
            self.why
        }
    }
}

pub(crate) struct Sender {
    pub(crate) host: Arc<dyn MigrationHost>,
    pub(crate) migration: Arc<Migration>,
    pub(crate) vm: String,
    endpoint: Endpoint,
    pub(crate) token: String,
    downtime: Duration,
    timeout: Duration,
    /// Bytes per second at most.
    bandwidth: Option<u64>,
    auto_converge: bool,
    /// Whether to offer a same-host destination the memory itself.
    share_memory: bool,
    /// Pair with a secondary instead of moving.
    ft: Option<crate::ft::PairOptions>,
    /// The primary's end of the pairing's second heartbeat path.
    pub(crate) beacon_socket: Option<std::net::UdpSocket>,
}

/// Writes pages to the stream (or to a fault-tolerance checkpoint's staging buffer): runs of
/// non-zero pages as `Pages`, runs of zero pages as `Zero`.
pub(crate) struct PageWriter<'a, W: Write = BufWriter<Conn>> {
    pub(crate) out: W,
    pub(crate) access: &'a MigrationAccess,
    frame: Vec<u8>,
    pub(crate) bytes: u64,
    pub(crate) pages: u64,
    progress: &'a Migration,
    /// Bytes per second at most, counted from `started`.
    bandwidth: Option<u64>,
    started: Instant,
    /// Pre-copy gives up past this (the last round, with the VM paused, has none).
    pub(crate) deadline: Option<(Instant, Duration)>,
    /// Same host: the open vsock and console connections follow the state.
    hand_over_connections: bool,
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bytes are valid u64s; the unaligned ends are checked bytewise.
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl<'a, W: Write> PageWriter<'a, W> {
    /// Another writer with the same memory and progress, writing to `out` (no bandwidth cap,
    /// no deadline): a checkpoint's staging buffer.
    pub(crate) fn staging<V: Write>(&self, out: V) -> PageWriter<'a, V> {
        PageWriter {
            out,
            access: self.access,
            frame: Vec::with_capacity(8 + protocol::MAX_PAGES_PER_FRAME * PAGE),
            bytes: 0,
            pages: 0,
            progress: self.progress,
            bandwidth: None,
            started: Instant::now(),
            deadline: None,
            hand_over_connections: false,
        }
    }

    fn frame(&mut self, kind: Kind, payload_len: usize) -> Result<(), String> {
        write_frame(&mut self.out, kind, &self.frame[..payload_len])
            .map_err(|e| format!("sending pages: {e}"))?;
        self.bytes += 5 + payload_len as u64;
        if let Some(rate) = self.bandwidth {
            let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let Some((deadline, timeout)) = self.deadline {
            if Instant::now() > deadline {
                return Err(format!(
                    "gave up after {timeout:?}: {} bytes sent and memory still to go",
                    self.bytes
                ));
            }
        }
        if self.progress.is_cancelled() {
            return Err("cancelled by request".into());
        }
        Ok(())
    }

    fn zero_run(&mut self, first: u64, count: u64) -> Result<(), String> {
        if count == 0 {
            return Ok(());
        }
        self.frame.clear();
        self.frame.extend_from_slice(&first.to_le_bytes());
        self.frame.extend_from_slice(&count.to_le_bytes());
        self.frame(Kind::Zero, 16)
    }

    /// Sends the pages of every region whose bit is set (all pages when `bits` is None; then
    /// pages the kernel never backed are sent as zeros without being read).
    pub(crate) fn send(&mut self, bits: Option<&[Bits]>) -> Result<(), String> {
        for (index, region) in self.access.memory.iter().enumerate() {
            let len = region.len() as usize;
            let pages = len / PAGE;
            let base_pfn = region.start_addr().0 / PAGE as u64;
            let slice = region
                .get_slice(vm_memory::MemoryRegionAddress(0), len)
                .map_err(|e| e.to_string())?;
            let host = slice.ptr_guard().as_ptr();
            let resident = match bits {
                None => crate::memory::data_pages(region),
                Some(_) => None,
            };
            let wanted = |p: usize| match bits {
                Some(b) => b[index]
                    .get(p / 64)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0),
                None => true,
            };
            let mut zero_start = 0u64;
            let mut zeros = 0u64;
            let mut run_first = 0u64;
            let mut run = 0usize;
            self.frame.clear();
            let mut page = 0;
            while page < pages {
                if !wanted(page) {
                    // A word of clear bits skips its 64 pages at once: the switch's scan of a
                    // large, mostly clean guest (0.4 ms for 2 GiB page by page).
                    let clear_word = bits.is_some_and(|b| b[index].get(page / 64) == Some(&0));
                    page += if clear_word { 64 - page % 64 } else { 1 };
                    continue;
                }
                let pfn = base_pfn + page as u64;
                let data = if resident.as_ref().is_some_and(|r| r[page] & 1 == 0) {
                    None
                } else {
                    // SAFETY: the page lies inside the region's mapping, which `memory` keeps
                    // alive. The guest may write it meanwhile: such a page is dirty in the next
                    // round's log and sent again, and the last round runs with the VM paused.
                    let bytes = unsafe { std::slice::from_raw_parts(host.add(page * PAGE), PAGE) };
                    (!is_zero(bytes)).then_some(bytes)
                };
                match data {
                    None => {
                        if run > 0 {
                            self.flush_run(run_first, run)?;
                            run = 0;
                        }
                        if zeros > 0 && zero_start + zeros != pfn {
                            self.zero_run(zero_start, zeros)?;
                            zeros = 0;
                        }
                        if zeros == 0 {
                            zero_start = pfn;
                        }
                        zeros += 1;
                    }
                    Some(bytes) => {
                        if zeros > 0 {
                            self.zero_run(zero_start, zeros)?;
                            zeros = 0;
                        }
                        if run > 0
                            && (run_first + run as u64 != pfn
                                || run == protocol::MAX_PAGES_PER_FRAME)
                        {
                            self.flush_run(run_first, run)?;
                            run = 0;
                        }
                        if run == 0 {
                            run_first = pfn;
                            self.frame.clear();
                            self.frame.extend_from_slice(&pfn.to_le_bytes());
                        }
                        self.frame.extend_from_slice(bytes);
                        run += 1;
                    }
                }
                page += 1;
            }
            if run > 0 {
                self.flush_run(run_first, run)?;
            }
            self.zero_run(zero_start, zeros)?;
        }
        self.out.flush().map_err(|e| format!("sending pages: {e}"))
    }

    fn flush_run(&mut self, _first: u64, run: usize) -> Result<(), String> {
        self.pages += run as u64;
        self.frame(Kind::Pages, 8 + run * PAGE)?;
        if self.pages % 4096 < run as u64 {
            let (bytes, pages) = (self.bytes, self.pages);
            self.progress.update(|i| {
                i.bytes = bytes;
                i.pages = pages;
            });
        }
        Ok(())
    }
}

const MIB: f64 = (1 << 20) as f64;

/// A last round expected to take no longer than this is not worth another round.
const NEGLIGIBLE_SWITCH: Duration = Duration::from_millis(1);

/// Whether pre-copy should stop and switch: the last round would fit the downtime budget, and
/// another round would not make it much shorter. While the dirty set still at least halves from
/// one round to the next (the guest dirties far slower than the link carries), one more round
/// costs a fraction of the last and shortens the pause the guest sees, so the budget is a
/// ceiling, not a target.
fn converged(
    expected_s: f64,
    budget: Duration,
    dirty_bytes: u64,
    previous_dirty: Option<u64>,
) -> bool {
    if expected_s > budget.as_secs_f64() {
        return false;
    }
    let shrinking = previous_dirty.is_none_or(|before| dirty_bytes.saturating_mul(2) <= before);
    expected_s <= NEGLIGIBLE_SWITCH.as_secs_f64() || !shrinking
}

impl Sender {
    pub(crate) fn command(&self, command: VmCommand) -> Result<VmReply, String> {
        self.host.vm_command(&self.vm, command, VM_TIMEOUT)
    }

    fn check_cancel(&self) -> Result<(), String> {
        if self.migration.is_cancelled() {
            Err("cancelled by request".into())
        } else {
            Ok(())
        }
    }

    fn handshake_bytes(
        &self,
        access: &MigrationAccess,
        same_host: bool,
    ) -> Result<Vec<u8>, String> {
        let config = self
            .host
            .running_config(&self.vm)
            .map_err(|e| e.to_string())?;
        let machine = &config.machine_config;
        let topology = CpuTopology::new(machine.vcpu_count, machine.smt);
        let cpuid = vcpu_cpuid(self.host.hypervisor().supported_cpuid(), 0, &topology);
        let sizes = match self.ft {
            Some(_) => drive_sizes(&config)?,
            None => Vec::new(),
        };
        let handshake = Handshake {
            format: protocol::FORMAT_VERSION,
            lockstep_version: env!("CARGO_PKG_VERSION").to_string(),
            config: serde_json::to_string(&config).map_err(|e| e.to_string())?,
            regions: crate::memory::region_layout(&access.memory),
            cpuid: cpuid.as_slice().iter().map(CpuidEntry::from).collect(),
            same_host,
            connections: same_host,
            ft: self.ft.as_ref().map(|ft| protocol::FtHello {
                pair: ft.pair.clone(),
                primary: ft.host_id.clone(),
                epoch_ms: ft.epoch.as_millis() as u64,
                heartbeat: self
                    .beacon_socket
                    .as_ref()
                    .and_then(|s| s.local_addr().ok())
                    .map(|a| a.to_string()),
                drive_sizes: sizes,
            }),
        };
        serde_json::to_vec(&handshake).map_err(|e| e.to_string())
    }

    fn page_writer<'a>(
        &'a self,
        writer: Conn,
        access: &'a MigrationAccess,
        deadline: Option<(Instant, Duration)>,
    ) -> PageWriter<'a> {
        PageWriter {
            out: BufWriter::with_capacity(1 << 20, writer),
            access,
            frame: Vec::with_capacity(8 + protocol::MAX_PAGES_PER_FRAME * PAGE),
            bytes: 0,
            pages: 0,
            progress: &self.migration,
            bandwidth: self.bandwidth,
            started: Instant::now(),
            deadline,
            hand_over_connections: false,
        }
    }

    fn run(&self) -> Result<(), Failure> {
        let conn = self
            .endpoint
            .connect(CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot connect to {}: {e}", self.endpoint))?;
        conn.set_timeouts(IO_TIMEOUT).map_err(|e| e.to_string())?;
        self.migration
            .set_conn(Some(conn.try_clone().map_err(|e| e.to_string())?));
        let mut reader = conn.try_clone().map_err(|e| e.to_string())?;
        let mut writer = conn;
        let refused = |e: protocol::ProtocolError| format!("the destination: {e}");

        let nonce = expect_frame(&mut reader, Kind::Hello, "Hello").map_err(refused)?;
        if nonce.len() != protocol::NONCE_BYTES {
            return Err("the destination's Hello has no nonce".into());
        }
        let mut access = match self.command(VmCommand::MigrationAccess)? {
            VmReply::Access(a) => a,
            other => return Err(format!("unexpected answer {other:?}").into()),
        };
        let same_host = self.share_memory && super::local::can_offer(&writer, &access.memory);
        if !same_host {
            // Only a same-host switch hands the taps and the vsock socket over. Held here they
            // would outlive the VM: after a planned failover this host's new secondary opens
            // the same taps (a second descriptor on a tap is refused).
            access.taps.clear();
            access.vsock = None;
        }
        let handshake = self.handshake_bytes(&access, same_host)?;
        let mut auth = protocol::mac(&self.token, &nonce, &handshake)
            .ok_or("the token cannot key an HMAC")?
            .to_vec();
        auth.extend_from_slice(&handshake);
        write_frame(&mut writer, Kind::Auth, &auth).map_err(|e| e.to_string())?;
        let accept = expect_frame(&mut reader, Kind::Accept, "Accept").map_err(refused)?;
        self.check_cancel()?;
        if same_host && (accept == [1] || accept == [1, 1]) {
            // Same host: the memory goes as memfds, the VM is built on them, and the switch
            // moves only the state.
            let vsock = access.vsock.as_ref().map(|(f, _)| &**f);
            super::local::send_memory(&writer, &access.memory, &access.taps, vsock)
                .map_err(|e| e.to_string())?;
            expect_frame(&mut reader, Kind::Accept, "Accept").map_err(refused)?;
            self.check_cancel()?;
            let mut pages = self.page_writer(writer, &access, None);
            // The destination takes the open connections too.
            pages.hand_over_connections = accept == [1, 1];
            return self.switch(None, Vec::new(), pages, &mut reader, 0);
        }

        self.migration.set_phase(MigrationPhase::Precopy);
        // The slots are briefly gone while logging starts: the vCPUs wait meanwhile.
        let was_running = self.command(VmCommand::Status)? == VmReply::State(RunState::Running);
        if was_running {
            self.command(VmCommand::Pause)?;
        }
        let log = DirtyLog::start(&access);
        if was_running {
            self.command(VmCommand::Resume)?;
        }
        let log = log?;
        let throttle = match self.auto_converge && was_running {
            true => {
                let control = self.host.vm_control(&self.vm)?;
                let name = format!("migrate-throttle-{}", self.migration.info().id);
                Some(super::throttle::Throttle::start(control, name).map_err(|e| e.to_string())?)
            }
            false => None,
        };
        let mut last_step = Instant::now();
        let deadline = Some((Instant::now() + self.timeout, self.timeout));
        let mut pages = self.page_writer(writer, &access, deadline);
        let started = Instant::now();
        let mut busy = Duration::ZERO;
        let mut dirty: Option<Vec<Bits>> = None;
        let mut previous_dirty: Option<u64> = None;
        let mut round = 0u32;
        loop {
            let round_start = Instant::now();
            let before = pages.bytes;
            pages.send(dirty.as_deref())?;
            write_frame(&mut pages.out, Kind::RoundEnd, &round.to_le_bytes())
                .and_then(|()| pages.out.flush())
                .map_err(|e| e.to_string())?;
            let took = round_start.elapsed();
            busy += took;
            let next = log.take()?;
            let dirty_bytes = count(&next) * PAGE as u64;
            // The link rate: bytes over time spent sending, never below what was just seen.
            let link = (pages.bytes as f64 / busy.as_secs_f64().max(1e-6)).max(1.0);
            let expected = dirty_bytes as f64 / link;
            let dirty_rate = dirty_bytes as f64 / took.as_secs_f64().max(1e-6);
            let (sent, sent_pages) = (pages.bytes, pages.pages);
            self.migration.update(|i| {
                i.round = round;
                i.bytes = sent;
                i.pages = sent_pages;
                i.link_rate_mib_s = link / MIB;
                i.dirty_rate_mib_s = dirty_rate / MIB;
                i.expected_downtime_ms = expected * 1e3;
                i.remaining_bytes = dirty_bytes;
            });
            log::debug!(
                "{}: migration round {round}: {} bytes in {took:?}; {dirty_bytes} dirty bytes",
                self.vm,
                pages.bytes - before
            );
            dirty = Some(next);
            self.check_cancel()?;
            if converged(expected, self.downtime, dirty_bytes, previous_dirty) {
                break;
            }
            previous_dirty = Some(dirty_bytes);
            if let Some(throttle) = &throttle {
                // One step at most every 200 ms: a step needs time to show in the dirty rate.
                if round >= 1 && last_step.elapsed() >= Duration::from_millis(200) {
                    let percent = throttle.step_up();
                    last_step = Instant::now();
                    self.migration.update(|i| i.throttle_percent = percent);
                    log::info!(
                        "{}: auto-converge: vCPUs paused {percent}% of the time",
                        self.vm
                    );
                }
            }
            if started.elapsed() > self.timeout {
                return Err(format!(
                    "gave up after {:?}: the guest dirties {:.1} MiB/s and the link carries {:.1} MiB/s, so the last round would take {:.0} ms, more than the {} ms allowed",
                    self.timeout,
                    dirty_rate / MIB,
                    link / MIB,
                    expected * 1e3,
                    self.downtime.as_millis()
                )
                .into());
            }
            round += 1;
        }
        // The VM runs freely again before the switch pauses it for good.
        drop(throttle);
        let pending = dirty.unwrap_or_default();
        if let Some(ft) = &self.ft {
            return crate::ft::primary::protect(self, ft, &log, pending, pages, &mut reader);
        }
        self.switch(Some(&log), pending, pages, &mut reader, round + 1)
    }

    /// Pauses the VM and moves the rest; resumes it on any failure before `Go`.
    fn switch(
        &self,
        log: Option<&DirtyLog>,
        pending: Vec<Bits>,
        mut pages: PageWriter,
        reader: &mut Conn,
        round: u32,
    ) -> Result<(), Failure> {
        self.migration.set_phase(MigrationPhase::Switching);
        // Most of the drives' dirty data goes while the guest still runs; the flush after the
        // pause then has little left to write.
        self.command(VmCommand::FlushDrives)?;
        let was_running = self.command(VmCommand::Status)? == VmReply::State(RunState::Running);
        let control = self.host.vm_control(&self.vm)?;
        let paused_at = Instant::now();
        match self.command(VmCommand::Pause)? {
            VmReply::State(RunState::Paused) => {}
            other => return Err(format!("cannot pause the VM: {other:?}").into()),
        }
        let before_go = (|| -> Result<(), String> {
            pages.deadline = None;
            // The VM's owner thread flushes the drives (the destination opens the same images:
            // every write the guest saw complete must be on the storage first) and captures
            // the machine state while this thread sends the last pages.
            let post = |command| control.post(command).map_err(|e| e.to_string());
            let flushed = post(VmCommand::FlushDrives)?;
            let captured = post(VmCommand::CaptureState)?;
            // What the last round left, and what was written since (none on the same host).
            if let Some(log) = log {
                let mut last = log.take()?;
                for (region, more) in last.iter_mut().zip(&pending) {
                    for (word, extra) in region.iter_mut().zip(more) {
                        *word |= extra;
                    }
                }
                pages.send(Some(&last))?;
            }
            log::debug!(
                "{}: switch: last pages sent at {:?}",
                self.vm,
                paused_at.elapsed()
            );
            flushed.wait(VM_TIMEOUT).map_err(|e| e.to_string())?;
            let state = match captured.wait(VM_TIMEOUT).map_err(|e| e.to_string())? {
                VmReply::MachineState(bytes) => bytes,
                other => return Err(format!("unexpected answer {other:?}")),
            };
            write_frame(&mut pages.out, Kind::RoundEnd, &round.to_le_bytes())
                .and_then(|()| write_frame(&mut pages.out, Kind::State, &state))
                .and_then(|()| pages.out.flush())
                .map_err(|e| format!("sending the state: {e}"))?;
            pages.bytes += state.len() as u64 + 10;
            if pages.hand_over_connections {
                let handed = match self.command(VmCommand::HandOverConnections)? {
                    VmReply::Connections(c) => c,
                    other => return Err(format!("unexpected answer {other:?}")),
                };
                super::connections::send_connections(pages.out.get_ref(), &handed.0)
                    .map_err(|e| e.to_string())?;
            }
            log::debug!(
                "{}: switch: {} bytes of state sent at {:?}",
                self.vm,
                state.len(),
                paused_at.elapsed()
            );
            reader.await_input(SWITCH_SPIN);
            expect_frame(reader, Kind::Ready, "Ready")
                .map_err(|e| format!("the destination: {e}"))?;
            self.check_cancel()
        })();
        let (sent, sent_pages) = (pages.bytes, pages.pages);
        self.migration.update(|i| {
            i.round = round;
            i.bytes = sent;
            i.pages = sent_pages;
        });
        if let Err(why) = before_go {
            // Nothing runs elsewhere: the destination never starts without Go.
            if was_running {
                if let Err(e) = self.command(VmCommand::Resume) {
                    return Err(Failure {
                        why: format!("{why}; and the VM could not be resumed: {e}"),
                        source_runs: false,
                    });
                }
            }
            return Err(why.into());
        }
        // From here on this VM never runs again.
        let go = write_frame(&mut pages.out, Kind::Go, &[u8::from(was_running)])
            .and_then(|()| pages.out.flush());
        let running = go.map_err(|e| e.to_string()).and_then(|()| {
            reader.await_input(SWITCH_SPIN);
            expect_frame(reader, Kind::Running, "Running").map_err(|e| e.to_string())
        });
        if let Err(e) = running {
            return Err(Failure {
                source_runs: false,
                why: format!(
                "Go was sent but the destination did not confirm ({e}): the outcome is unknown, the VM stays paused here and must not be resumed unless the destination has no copy"
                ),
            });
        }
        let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
        log::debug!(
            "{}: switch: Ready and Running after {downtime:.1} ms",
            self.vm
        );
        self.migration.update(|i| {
            i.downtime_ms = Some(downtime);
            i.remaining_bytes = 0;
        });
        if log.is_none() {
            // Same host: the destination owns the VM's sockets now.
            pages.access.sockets_handed_over();
        }
        log::info!(
            "{}: migrated to {} (pause {downtime:.1} ms, {} bytes)",
            self.vm,
            self.endpoint,
            pages.bytes
        );
        self.host.remove_migrated(&self.vm);
        Ok(())
    }
}

/// The size of each drive's image, in the config's order.
fn drive_sizes(config: &lockstep_api::VmConfig) -> Result<Vec<u64>, String> {
    config
        .drives
        .iter()
        .map(|d| {
            std::fs::metadata(&d.path_on_host)
                .map(|m| m.len())
                .map_err(|e| format!("drive {:?}: {}: {e}", d.drive_id, d.path_on_host.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_millis(20);

    #[test]
    fn a_last_round_over_budget_never_switches() {
        assert!(!converged(0.021, BUDGET, 1 << 20, Some(1 << 30)));
        assert!(!converged(0.021, BUDGET, 1 << 20, Some(1 << 20)));
    }

    #[test]
    fn a_dirty_set_that_still_halves_gets_another_round() {
        // Within budget, but the set went from 64 MiB to 8 MiB: one more round is cheap.
        assert!(!converged(0.008, BUDGET, 8 << 20, Some(64 << 20)));
        // After the first round there is nothing to compare with: the set surely shrank.
        assert!(!converged(0.008, BUDGET, 8 << 20, None));
    }

    #[test]
    fn a_dirty_set_that_stopped_shrinking_or_a_negligible_one_switches() {
        assert!(converged(0.008, BUDGET, 8 << 20, Some(10 << 20)));
        assert!(converged(0.0005, BUDGET, 1 << 20, Some(64 << 20)));
        assert!(converged(0.0005, BUDGET, 1 << 20, None));
    }
}
