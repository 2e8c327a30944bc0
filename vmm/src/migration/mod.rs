//! Live migration: a running VM moves to another `lockstep host` over TCP or a Unix socket.
//! `protocol` is the stream (bounded frames, the HMAC handshake), `send` the source (pre-copy
//! from KVM's dirty log, the switch), `receive` the destination (a one-shot listener, the VM
//! built while pages stream), `progress` the terminal's progress lines. ARCHITECTURE.md ("Live
//! migration") describes the protocol and what each side does when the connection dies.
//!
//! The host reaches a migration only through [`MigrationHost`] and the [`Migrations`] registry,
//! which the control API reads; every migration thread is spawned by [`spawn_thread`].

mod connections;
pub(crate) mod devices;
pub(crate) mod dirty;
mod local;
mod progress;
pub mod protocol;
pub(crate) mod receive;
pub(crate) mod send;
mod throttle;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lockstep_api::control::ControlError;
use lockstep_api::migration::{MigrationDirection, MigrationInfo, MigrationPhase};
use lockstep_api::VmConfig;

use crate::kvm::Hypervisor;
use crate::vm::{Vm, VmCommand, VmReply};
use protocol::Conn;

pub use connections::{HandedConnections, SharedConnections};
pub(crate) use devices::flush_drives;
pub use local::{same_user, LocalError};
pub use progress::{clear_for_log_line, progress_line, spawn_terminal_progress};
pub use receive::{land_pages, start_incoming};
pub use send::start_outgoing;

/// What a migration needs from its host.
pub trait MigrationHost: Send + Sync + 'static {
    /// A running VM's control handle, for commands the host need not record (auto-converge's
    /// short pauses).
    fn vm_control(&self, name: &str) -> Result<crate::vm::VmControl, String>;
    /// The host's KVM.
    fn hypervisor(&self) -> &Hypervisor;
    /// The host's migrations.
    fn migrations(&self) -> &Migrations;
    /// True when a VM has that name here.
    fn vm_exists(&self, name: &str) -> bool;
    /// Checks an arriving VM's config and gives it its place under `name` (serial log, console
    /// socket, folder), as for a restored VM. From a same-host source (`local`) a live console
    /// socket at that place is the source's, this VM's after the switch (a takeover).
    fn place_incoming(&self, name: &str, config: &mut VmConfig, local: bool) -> Result<(), String>;
    /// Runs a received VM under `name` (or keeps it paused).
    fn adopt(&self, name: &str, vm: Vm, paused: bool) -> Result<(), String>;
    /// Removes what `place_incoming` made for a VM that did not arrive (an empty folder).
    fn forget_incoming(&self, name: &str);
    /// A running VM's config.
    fn running_config(&self, name: &str) -> Result<VmConfig, ControlError>;
    /// Sends a command to a VM (the host records pause and resume).
    fn vm_command(
        &self,
        name: &str,
        command: VmCommand,
        timeout: Duration,
    ) -> Result<VmReply, String>;
    /// Ends a VM that now runs elsewhere and removes it from the host.
    fn remove_migrated(&self, name: &str);
}

/// Spawns a migration thread. Every thread this module starts goes through here (the place to
/// give them their own seccomp filter).
pub fn spawn_thread(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(body)
}

/// One migration: its progress, its cancel flag and its connection (shut down to cancel).
pub struct Migration {
    info: Mutex<MigrationInfo>,
    started: Instant,
    /// How long it took, once it has ended.
    took: Mutex<Option<Duration>>,
    cancel: AtomicBool,
    /// A planned failover of a pairing was asked for.
    failover: AtomicBool,
    conn: Mutex<Option<Conn>>,
}

impl Migration {
    fn new(id: String, direction: MigrationDirection, vm: &str, phase: MigrationPhase) -> Self {
        Migration {
            info: Mutex::new(MigrationInfo::new(id, direction, vm, phase)),
            started: Instant::now(),
            took: Mutex::new(None),
            cancel: AtomicBool::new(false),
            failover: AtomicBool::new(false),
            conn: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MigrationInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its progress now.
    pub fn info(&self) -> MigrationInfo {
        let mut info = self.lock().clone();
        let took = *self.took.lock().unwrap_or_else(|p| p.into_inner());
        info.elapsed_ms = took.unwrap_or_else(|| self.started.elapsed()).as_secs_f64() * 1e3;
        info
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut MigrationInfo)) {
        change(&mut self.lock());
    }

    pub(crate) fn set_phase(&self, phase: MigrationPhase) {
        self.update(|i| i.phase = phase);
    }

    /// Records that the pairing or migration ended on purpose (it ends as cancelled).
    pub(crate) fn mark_cancelled(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// True once a planned failover was asked for.
    pub(crate) fn failover_asked(&self) -> bool {
        self.failover.load(Ordering::SeqCst)
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn set_conn(&self, conn: Option<Conn>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }

    /// Records how it ended (the time it took is the first ending's: a planned failover's
    /// primary ends its record before its thread does, so that the VM's name is free).
    pub(crate) fn finish(&self, outcome: Result<(), String>) {
        self.took
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(self.started.elapsed());
        let cancelled = self.is_cancelled();
        self.update(|i| match outcome {
            Ok(()) => i.phase = MigrationPhase::Completed,
            Err(why) => {
                i.phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                i.error = Some(why);
            }
        });
        self.set_conn(None);
    }
}

/// A host's migrations, by id.
#[derive(Default)]
pub struct Migrations {
    next: AtomicU64,
    table: Mutex<BTreeMap<String, Arc<Migration>>>,
}

impl Migrations {
    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Migration>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new migration of `vm`; refused while another one of the same VM (or name, for
    /// an incoming one) is under way.
    fn add(
        &self,
        direction: MigrationDirection,
        vm: &str,
        phase: MigrationPhase,
    ) -> Result<Arc<Migration>, ControlError> {
        let mut table = self.table();
        if table.values().any(|m| {
            let i = m.lock();
            i.vm == vm && !i.phase.ended()
        }) {
            return Err(ControlError::Conflict(format!(
                "a migration of {vm:?} is under way"
            )));
        }
        let id = (self.next.fetch_add(1, Ordering::SeqCst) + 1).to_string();
        let migration = Arc::new(Migration::new(id.clone(), direction, vm, phase));
        table.insert(id, migration.clone());
        Ok(migration)
    }

    /// Asks the primary of a pairing (`id`, outgoing, protecting) for a planned failover.
    pub fn failover(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        let migration = self
            .table()
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("migration {id}")))?;
        let info = migration.info();
        if info.phase != MigrationPhase::Protecting
            || info.direction != lockstep_api::migration::MigrationDirection::Outgoing
        {
            return Err(ControlError::Conflict(format!(
                "migration {id} is not the primary side of a protected pair ({})",
                info.phase.name()
            )));
        }
        migration.failover.store(true, Ordering::SeqCst);
        Ok(migration.info())
    }

    /// True while an incoming migration holds `name`.
    pub fn name_reserved(&self, name: &str) -> bool {
        self.table().values().any(|m| {
            let i = m.lock();
            i.direction == MigrationDirection::Incoming && i.vm == name && !i.phase.ended()
        })
    }

    /// Every migration's progress, oldest first. Entries are kept once ended: the counters at
    /// `/metrics` are computed from them.
    pub fn list(&self) -> Vec<MigrationInfo> {
        let mut all: Vec<MigrationInfo> = self.table().values().map(|m| m.info()).collect();
        all.sort_by_key(|i| i.id.parse::<u64>().unwrap_or(u64::MAX));
        all
    }

    /// A migration's progress.
    pub fn get(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        self.table()
            .get(id)
            .map(|m| m.info())
            .ok_or_else(|| ControlError::NotFound(format!("migration {id}")))
    }

    /// Cancels a migration that has not switched: its thread gives up at the next step (its
    /// connection is shut down at once), and a source VM runs on.
    pub fn cancel(&self, id: &str) -> Result<MigrationInfo, ControlError> {
        let migration = self
            .table()
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("migration {id}")))?;
        let phase = migration.lock().phase;
        if phase.ended() {
            return Err(ControlError::Conflict(format!(
                "migration {id} has ended ({phase:?})"
            )));
        }
        if phase == MigrationPhase::Switching {
            return Err(ControlError::Conflict(format!(
                "migration {id} is switching over and can no longer be cancelled"
            )));
        }
        migration.cancel.store(true, Ordering::SeqCst);
        if phase == MigrationPhase::Protecting {
            // The primary unpairs at its next epoch, telling the secondary (which must not
            // take the closed connection for a dead primary).
            return Ok(migration.info());
        }
        if let Some(conn) = migration
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            conn.shutdown();
        }
        Ok(migration.info())
    }
}
