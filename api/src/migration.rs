//! The control API's live-migration types: a host asked to receive a VM, a VM sent to another
//! host, and a migration's progress.

use serde::{Deserialize, Serialize};

/// `POST /v1/migrations/incoming`: receive one VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// Where to listen: `IP:PORT` (port 0 picks one) or `unix:/absolute/path`.
    pub listen: String,
    /// The name the VM gets on this host.
    pub name: String,
    /// Taps of this host to use instead of the ones the source's config names (as
    /// Firecracker's `network_overrides` on snapshot load).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Where the vsock device's socket goes on this host instead of the source's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Images of this host to use instead of the paths the source's config names: a
    /// fault-tolerant secondary keeps its own copy of each disk (and makes one that does not
    /// exist yet, at the primary's size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    /// Wait as the secondary of a fault-tolerant pair instead of taking the VM over: the VM is
    /// built and kept up to date but runs only when the primary is gone (see [`FtOptions`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtOptions>,
}

/// One side of a fault-tolerant pair: where the arbiter is and who this host is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtOptions {
    /// etcd client endpoints (`IP:PORT`): the arbiter whose compare-and-swap decides which side
    /// is live.
    pub arbiter: Vec<String>,
    /// This host's id in the pair's record (letters, digits, `-`, `_`, `.`).
    pub host_id: String,
    /// The pair's id in the arbiter (default: the VM's name on the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<String>,
    /// Milliseconds between checkpoints, 10 to 200 (default 50; the primary's choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_ms: Option<u64>,
    /// Silence on the replication connection after which a side acts, milliseconds, 20 to
    /// 10000 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout_ms: Option<u64>,
    /// A second heartbeat path: a UDP address of this host (`IP:PORT`, port 0 picks one), best
    /// on another network than the replication connection. Used when both sides name one: a
    /// secondary that still hears the primary there does not take over when the replication
    /// connection goes silent (the link broke, not the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_path: Option<String>,
    /// A standby host's listener (opened with `ft` there): whichever side of this pair is left
    /// running the VM alone (the primary that lost its secondary, or the secondary that took
    /// over) pairs with it at once, so the VM is protected again without an operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<FtStandby>,
}

/// A standby host's listener for re-protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FtStandby {
    /// Its listener: `IP:PORT`.
    pub destination: String,
    /// The token its `POST /v1/migrations/incoming` returned.
    pub token: String,
}

/// What a fault-tolerant pairing is doing, in its migration's info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FtStatus {
    /// `primary` or `secondary`.
    pub role: String,
    /// The pair's id in the arbiter.
    pub pair: String,
    /// Checkpoints taken (primary) or received whole (secondary).
    pub epoch: u64,
    /// The last checkpoint the secondary applied and acknowledged.
    pub committed_epoch: Option<u64>,
    /// Milliseconds since that acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_commit_ms: Option<f64>,
    /// The guest's pause per checkpoint (from its vCPUs' exit for the checkpoint to their
    /// re-entry, the longest vCPU's), median and 99th percentile of the last 1000, ms.
    pub pause_p50_ms: f64,
    /// See `pause_p50_ms`.
    pub pause_p99_ms: f64,
    /// Checkpoint bytes sent (received) per second over the last second or so, MiB/s.
    pub replication_mib_s: f64,
    /// The arbiter's epoch of the pair's record as this side last saw it.
    pub arbiter_epoch: u64,
    /// Whether the VM is protected, as this side sees it.
    pub redundancy: FtRedundancy,
}

/// How protected a pair's VM is (CIM_RedundancySet's RedundancyStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FtRedundancy {
    /// Two copies: the VM runs on the primary and the secondary is up to date.
    Full,
    /// The VM runs, but with no secondary (it was lost, took over, or the pair was unpaired).
    Degraded,
    /// This side's copy has ended (it lost the arbiter, failed over, or gave up as secondary).
    Lost,
}

/// One network interface of an arriving VM put on another tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as the VM's config names it.
    pub iface_id: String,
    /// The tap on this host.
    pub host_dev_name: String,
}

/// One drive of an arriving VM on another image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive, as the VM's config names it.
    pub drive_id: String,
    /// The image on this host.
    pub path_on_host: std::path::PathBuf,
}

/// An arriving VM's vsock socket put elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The Unix socket host programs connect to on this host.
    pub uds_path: std::path::PathBuf,
}

/// A listener waiting for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingInfo {
    /// The migration's id (for `GET /v1/migrations/{id}`).
    pub id: String,
    /// Where it listens (the real port when 0 was asked for).
    pub listen: String,
    /// The one-time token the sender must prove it holds (32 random bytes, hex).
    pub token: String,
}

/// `POST /v1/vms/{name}/migrate`: send a running VM to a host that expects it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination's listener: `IP:PORT` or `unix:/absolute/path`.
    pub destination: String,
    /// The token the destination's `POST /v1/migrations/incoming` returned.
    pub token: String,
    /// The longest pause allowed at the switch, milliseconds (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Give up after this many seconds of pre-copy (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Send at most this many MiB per second (default: as fast as the link goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<u64>,
    /// Slow the vCPUs down step by step while the guest dirties memory faster than it can be
    /// sent (default false).
    #[serde(default)]
    pub auto_converge: bool,
    /// Over a Unix socket to a host of the same user, hand guest memory over instead of
    /// copying it (default true); false copies it as over TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_memory: Option<bool>,
    /// Pair the VM with a secondary (the destination, listening with `ft` too) instead of
    /// moving it: after the full copy the VM keeps running here and checkpoints go to the
    /// secondary every epoch until it is unpaired (`DELETE` of the migration) or a side fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtOptions>,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Waiting for the source to connect.
    Listening,
    /// Checking the handshake.
    Handshake,
    /// Copying memory while the VM runs.
    Precopy,
    /// The VM is paused; the last pages and the state move.
    Switching,
    /// Fault tolerance, the primary: the VM runs here and its checkpoints go to the secondary.
    Protecting,
    /// Fault tolerance, the secondary: the VM is kept at the last checkpoint, ready to take over.
    Standby,
    /// The VM runs on the destination.
    Completed,
    /// Given up; see `error`.
    Failed,
    /// Cancelled by request; the source VM runs on.
    Cancelled,
}

impl MigrationPhase {
    /// Whether the migration has ended (completed, failed or cancelled).
    pub fn ended(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// The phase as the JSON API spells it.
    pub fn name(self) -> &'static str {
        match self {
            MigrationPhase::Listening => "listening",
            MigrationPhase::Handshake => "handshake",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::Switching => "switching",
            MigrationPhase::Protecting => "protecting",
            MigrationPhase::Standby => "standby",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        }
    }
}

/// Whether this host sends or receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationDirection {
    /// This host sends the VM.
    Outgoing,
    /// This host receives it.
    Incoming,
}

impl MigrationDirection {
    /// The direction as the JSON API spells it.
    pub fn name(self) -> &'static str {
        match self {
            MigrationDirection::Outgoing => "outgoing",
            MigrationDirection::Incoming => "incoming",
        }
    }
}

/// A migration's progress (`GET /v1/migrations/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Its id.
    pub id: String,
    /// Sending or receiving.
    pub direction: MigrationDirection,
    /// The VM's name on this host.
    pub vm: String,
    /// Where it is.
    pub phase: MigrationPhase,
    /// The pre-copy round under way (0: every page).
    pub round: u32,
    /// Bytes sent or received on the stream.
    pub bytes: u64,
    /// Pages sent or received as bytes (zero pages excluded).
    pub pages: u64,
    /// Pages the guest dirtied per second in the last round, in MiB/s.
    pub dirty_rate_mib_s: f64,
    /// The measured link rate, MiB/s.
    pub link_rate_mib_s: f64,
    /// The pause the last dirty set would take at the link rate, milliseconds.
    pub expected_downtime_ms: f64,
    /// What is left to send: the pages the guest dirtied during the last round, in bytes (the
    /// whole memory's non-zero part before round 0 ends is not known in advance).
    #[serde(default)]
    pub remaining_bytes: u64,
    /// The share of time auto-converge keeps the vCPUs paused, percent.
    pub throttle_percent: u32,
    /// The pause the VM had (source paused to destination running), milliseconds, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Time since the migration started (until it ended, once it has), milliseconds.
    pub elapsed_ms: f64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A fault-tolerant pairing's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ft: Option<FtStatus>,
}

impl MigrationInfo {
    /// A migration that has just started: nothing sent, nothing measured.
    pub fn new(id: String, direction: MigrationDirection, vm: &str, phase: MigrationPhase) -> Self {
        MigrationInfo {
            id,
            direction,
            vm: vm.to_string(),
            phase,
            round: 0,
            bytes: 0,
            pages: 0,
            dirty_rate_mib_s: 0.0,
            link_rate_mib_s: 0.0,
            expected_downtime_ms: 0.0,
            remaining_bytes: 0,
            throttle_percent: 0,
            downtime_ms: None,
            elapsed_ms: 0.0,
            error: None,
            ft: None,
        }
    }

    /// An estimate of how far along it is, 0 to 100, for progress displays (CIM's
    /// PercentComplete, the terminal). Waiting and the handshake count as 0; round 0, which
    /// sends every page that is not all zeros, runs from 5 to 80 by the bytes sent over
    /// `memory_bytes` (the VM's memory, when known); each later round adds 2, up to 90; the
    /// switch is 95; the end 100 (whatever the outcome: the work has stopped).
    pub fn percent_complete(&self, memory_bytes: Option<u64>) -> u16 {
        match self.phase {
            MigrationPhase::Listening | MigrationPhase::Handshake => 0,
            MigrationPhase::Precopy if self.round == 0 => {
                let share = match memory_bytes {
                    Some(total) if total > 0 => (self.bytes as f64 / total as f64).min(1.0),
                    _ => 0.0,
                };
                5 + (share * 75.0) as u16
            }
            MigrationPhase::Precopy => 80 + (self.round.min(5) as u16) * 2,
            MigrationPhase::Switching => 95,
            // The full copy is done; the pairing goes on until a side fails or unpairs.
            MigrationPhase::Protecting | MigrationPhase::Standby => 99,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled => 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(phase: MigrationPhase, round: u32, bytes: u64) -> MigrationInfo {
        MigrationInfo {
            round,
            bytes,
            ..MigrationInfo::new("1".into(), MigrationDirection::Outgoing, "vm", phase)
        }
    }

    #[test]
    fn percent_moves_with_the_phase_and_the_bytes() {
        let mem = Some(100 << 20);
        assert_eq!(
            info(MigrationPhase::Handshake, 0, 0).percent_complete(mem),
            0
        );
        assert_eq!(info(MigrationPhase::Precopy, 0, 0).percent_complete(mem), 5);
        assert_eq!(
            info(MigrationPhase::Precopy, 0, 50 << 20).percent_complete(mem),
            42
        );
        // Bytes beyond the memory (frame headers, a page sent twice) stop at round 0's end.
        assert_eq!(
            info(MigrationPhase::Precopy, 0, 200 << 20).percent_complete(mem),
            80
        );
        assert_eq!(
            info(MigrationPhase::Precopy, 0, 50 << 20).percent_complete(None),
            5
        );
        assert_eq!(
            info(MigrationPhase::Precopy, 2, 0).percent_complete(mem),
            84
        );
        assert_eq!(
            info(MigrationPhase::Precopy, 40, 0).percent_complete(mem),
            90
        );
        assert_eq!(
            info(MigrationPhase::Switching, 3, 0).percent_complete(mem),
            95
        );
        assert_eq!(
            info(MigrationPhase::Completed, 3, 0).percent_complete(mem),
            100
        );
        assert!(MigrationPhase::Cancelled.ended() && !MigrationPhase::Switching.ended());
        // The names match the JSON API's.
        for phase in [
            MigrationPhase::Listening,
            MigrationPhase::Precopy,
            MigrationPhase::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.name());
        }
        assert_eq!(
            serde_json::to_value(MigrationDirection::Incoming).unwrap(),
            MigrationDirection::Incoming.name()
        );
    }
}
