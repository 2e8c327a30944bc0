//! Fault tolerance: a VM paired with a shadow on another host. A pairing is a live migration
//! that does not switch: after the full copy the primary keeps running its VM and sends a
//! checkpoint (the pages dirtied since the last one, and the machine state) every epoch; the
//! secondary stages each checkpoint whole, applies it, and acknowledges it. Either side that
//! hears nothing from the other for the heartbeat timeout asks the arbiter (etcd) to make it
//! the live one; exactly one can win. See ARCHITECTURE.md, "Fault tolerance".

pub mod arbiter;
pub(crate) mod beacon;
pub mod gateway;
pub(crate) mod primary;
pub(crate) mod secondary;

use std::net::SocketAddr;
use std::time::Duration;

use lockstep_api::control::ControlError;
use lockstep_api::migration::{FtOptions, FtStandby};

pub use arbiter::{Arbiter, ArbiterConfig, ArbiterError, FtRecord, Lease, Observed};

/// The shortest and longest epoch a pairing takes, milliseconds.
pub const EPOCH_MS: std::ops::RangeInclusive<u64> = 10..=200;
/// The shortest and longest heartbeat timeout, milliseconds.
pub const TIMEOUT_MS: std::ops::RangeInclusive<u64> = 20..=10_000;
/// The most arbiter endpoints a pairing names.
pub const MAX_ENDPOINTS: usize = 8;

/// One side's pairing options, checked.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// etcd's endpoints.
    pub arbiter: Vec<SocketAddr>,
    /// This host's id in the pair's record.
    pub host_id: String,
    /// The pair's id in the arbiter.
    pub pair: String,
    /// Time between checkpoints (the primary's).
    pub epoch: Duration,
    /// Silence after which a side acts.
    pub timeout: Duration,
    /// Where to pair again when this side is left alone with the VM.
    pub standby: Option<lockstep_api::migration::FtStandby>,
    /// This side's end of the second heartbeat path (UDP).
    pub heartbeat_path: Option<SocketAddr>,
}

impl PairOptions {
    /// Checks a request's options; the pair's id defaults to `vm`.
    pub fn check(options: &FtOptions, vm: &str) -> Result<PairOptions, ControlError> {
        let bad = |why: String| ControlError::BadRequest(format!("ft: {why}"));
        if options.arbiter.is_empty() || options.arbiter.len() > MAX_ENDPOINTS {
            return Err(bad(format!(
                "arbiter: name 1 to {MAX_ENDPOINTS} etcd endpoints (IP:PORT)"
            )));
        }
        let arbiter = options
            .arbiter
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|_| bad(format!("arbiter: {a:?} is not IP:PORT")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        arbiter::check_id("host", &options.host_id).map_err(|e| bad(format!("host_id: {e}")))?;
        let pair = options.pair.clone().unwrap_or_else(|| vm.to_string());
        arbiter::check_id("pair", &pair).map_err(|e| bad(format!("pair: {e}")))?;
        let epoch_ms = options.epoch_ms.unwrap_or(50);
        if !EPOCH_MS.contains(&epoch_ms) {
            return Err(bad(format!(
                "epoch_ms: {epoch_ms} is not within {}..={}",
                EPOCH_MS.start(),
                EPOCH_MS.end()
            )));
        }
        let timeout_ms = options.heartbeat_timeout_ms.unwrap_or(100);
        if !TIMEOUT_MS.contains(&timeout_ms) {
            return Err(bad(format!(
                "heartbeat_timeout_ms: {timeout_ms} is not within {}..={}",
                TIMEOUT_MS.start(),
                TIMEOUT_MS.end()
            )));
        }
        if let Some(standby) = &options.standby {
            if standby.token.is_empty() {
                return Err(bad("standby.token: empty".into()));
            }
            match crate::migration::protocol::Endpoint::parse(&standby.destination) {
                Ok(crate::migration::protocol::Endpoint::Tcp(_)) => {}
                _ => {
                    return Err(bad(format!(
                        "standby.destination: {:?} is not IP:PORT",
                        standby.destination
                    )))
                }
            }
        }
        let heartbeat_path = match &options.heartbeat_path {
            None => None,
            Some(a) => match a.parse::<SocketAddr>() {
                Ok(addr) if !addr.ip().is_unspecified() => Some(addr),
                Ok(_) => {
                    return Err(bad(format!(
                        "heartbeat_path: {a:?}: name this host's address on that network"
                    )))
                }
                Err(_) => return Err(bad(format!("heartbeat_path: {a:?} is not IP:PORT"))),
            },
        };
        Ok(PairOptions {
            heartbeat_path,
            arbiter,
            host_id: options.host_id.clone(),
            pair,
            epoch: Duration::from_millis(epoch_ms),
            timeout: Duration::from_millis(timeout_ms),
            standby: options.standby.clone(),
        })
    }

    /// These options as a request names them (`standby` this side's).
    pub fn request(&self) -> FtOptions {
        FtOptions {
            arbiter: self.arbiter.iter().map(|a| a.to_string()).collect(),
            host_id: self.host_id.clone(),
            pair: Some(self.pair.clone()),
            epoch_ms: Some(self.epoch.as_millis() as u64),
            heartbeat_timeout_ms: Some(self.timeout.as_millis() as u64),
            standby: self.standby.clone(),
            heartbeat_path: self.heartbeat_path.map(|a| a.to_string()),
        }
    }

    /// Binds this side's end of the second heartbeat path, if it has one.
    pub fn bind_heartbeat_path(&self) -> Result<Option<std::net::UdpSocket>, ControlError> {
        self.heartbeat_path
            .map(|addr| {
                std::net::UdpSocket::bind(addr).map_err(|e| {
                    ControlError::BadRequest(format!("ft: heartbeat_path: cannot bind {addr}: {e}"))
                })
            })
            .transpose()
    }

    /// Pairs `vm`, left alone with it on this host, with the standby host if one is named:
    /// this side is the new primary (same pair, arbiter and timing), the standby its secondary.
    pub fn reprotect(&self, host: std::sync::Arc<dyn crate::migration::MigrationHost>, vm: &str) {
        if let Some(standby) = &self.standby {
            // The standby's listener is used up by this pairing.
            self.pair_with(host, vm, standby, "the standby", None);
        }
    }

    /// Pairs `vm`, running on this host, with the listener `secondary` names (`what` says
    /// whose it is, for the log): this side is the primary, with these options and `standby`
    /// for the new pairing.
    pub fn pair_with(
        &self,
        host: std::sync::Arc<dyn crate::migration::MigrationHost>,
        vm: &str,
        secondary: &FtStandby,
        what: &str,
        standby: Option<FtStandby>,
    ) {
        let request = lockstep_api::migration::MigrateRequest {
            destination: secondary.destination.clone(),
            token: secondary.token.clone(),
            downtime_ms: None,
            timeout_s: None,
            max_bandwidth_mib_s: None,
            auto_converge: false,
            share_memory: Some(false),
            ft: Some(FtOptions {
                standby,
                ..self.request()
            }),
        };
        match crate::migration::start_outgoing(host, vm, request) {
            Ok(info) => log::info!(
                "{vm}: pairing with {what} at {} (migration {})",
                secondary.destination,
                info.id
            ),
            Err(e) => log::error!(
                "{vm}: cannot pair with {what} at {}: {e}",
                secondary.destination
            ),
        }
    }

    /// How often a side says it is still there: four times per timeout.
    pub fn heartbeat(&self) -> Duration {
        self.timeout / 4
    }
}

/// Pause times of the last checkpoints, for the status's percentiles.
#[derive(Default)]
pub(crate) struct Pauses(std::collections::VecDeque<f64>);

impl Pauses {
    const KEEP: usize = 1000;

    pub(crate) fn add(&mut self, pause: Duration) {
        if self.0.len() == Self::KEEP {
            self.0.pop_front();
        }
        self.0.push_back(pause.as_secs_f64() * 1e3);
    }

    /// The `q` quantile (0 to 1) in milliseconds, 0 with none.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

#[cfg(test)]
mod tests;
