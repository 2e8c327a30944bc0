//! The host's counters in Prometheus's text exposition format (version 0.0.4), for `GET /metrics`.
//!
//! The counters arrive as snapshots of name-to-value maps (their names come from the VMM and the
//! devices), so this module writes the text itself rather than keeping a registry of live metric
//! objects: each counter name becomes one family, `lockstep_vcpu_<name>_total` or
//! `lockstep_device_<name>_total`, with the VM (and the device's kind and id) as labels.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::control::{HostControl, HostInfo, VmInfo, VmMetrics, VmState};
use crate::migration::{MigrationDirection, MigrationInfo, MigrationPhase};

/// Every VM state, for the state gauge (one series per state, 1 for the current one).
const ALL_STATES: [VmState; 6] = [
    VmState::Created,
    VmState::Running,
    VmState::Paused,
    VmState::ShuttingDown,
    VmState::Stopped,
    VmState::Failed,
];

/// The state's name as the JSON API spells it.
pub fn state_name(state: VmState) -> &'static str {
    match state {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::ShuttingDown => "shutting_down",
        VmState::Stopped => "stopped",
        VmState::Failed => "failed",
    }
}

/// Asks the host for everything `GET /metrics` shows and renders it. VMs whose counters cannot
/// be read (one deleted meanwhile) still show their state.
pub fn collect(host: &dyn HostControl) -> String {
    let info = host.host_info();
    let vms = host.list_vms();
    let metrics: Vec<VmMetrics> = vms
        .iter()
        .filter_map(|vm| match host.vm_metrics(&vm.name) {
            Ok(m) => Some(m),
            Err(e) => {
                log::debug!("metrics: {}: {e}", vm.name);
                None
            }
        })
        .collect();
    let mut text = render(&info, &vms, &metrics);
    text.push_str(&render_migrations(&host.list_migrations()));
    text
}

/// One metric family: its help, type and samples (label text, value).
struct Family {
    help: String,
    kind: &'static str,
    samples: Vec<(String, String)>,
}

/// Families by name, written in name order; each family's samples stay together as the format
/// requires.
#[derive(Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &str,
        kind: &'static str,
        help: &str,
        labels: &[(&str, &str)],
        value: u64,
    ) {
        self.add_text(name, kind, help, labels, value.to_string());
    }

    fn add_text(
        &mut self,
        name: &str,
        kind: &'static str,
        help: &str,
        labels: &[(&str, &str)],
        value: String,
    ) {
        let family = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            });
        let labels = label_text(labels);
        if family.samples.iter().any(|(l, _)| *l == labels) {
            // Two counter names that differ only in characters a metric name cannot hold.
            log::debug!("metrics: {name}{labels} given twice; keeping the first");
            return;
        }
        family.samples.push((labels, value));
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, family) in &self.families {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, value) in &family.samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
        out
    }
}

/// `{a="x",b="y"}`, or nothing without labels.
fn label_text(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Help text escapes backslash and newline.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A counter's name as part of a metric name: `[a-zA-Z0-9_]`, not starting with a digit.
fn metric_part(name: &str) -> String {
    let mut part: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if part.is_empty() || part.starts_with(|c: char| c.is_ascii_digit()) {
        part.insert(0, '_');
    }
    part
}

/// `prefix_<counter>_total`.
fn counter_name(prefix: &str, counter: &str) -> String {
    let part = metric_part(counter);
    let part = part.strip_suffix("_total").unwrap_or(&part);
    format!("{prefix}_{part}_total")
}

const MIB: u64 = 1 << 20;

/// Renders the host, its VMs and their counters.
pub fn render(host: &HostInfo, vms: &[VmInfo], metrics: &[VmMetrics]) -> String {
    let mut e = Exposition::default();
    e.add(
        "lockstep_host_info",
        "gauge",
        "The lockstep host: its version and KVM backend (always 1).",
        &[
            ("version", &host.version),
            ("kvm_backend", &host.kvm_backend),
        ],
        1,
    );
    e.add(
        "lockstep_host_cpus",
        "gauge",
        "Host CPUs.",
        &[],
        u64::from(host.cpus),
    );
    e.add(
        "lockstep_host_memory_bytes",
        "gauge",
        "Host memory in bytes.",
        &[],
        host.mem_mib.saturating_mul(MIB),
    );
    e.add(
        "lockstep_host_vms",
        "gauge",
        "VMs defined on the host.",
        &[],
        host.vm_count as u64,
    );
    for vm in vms {
        let name = vm.name.as_str();
        for state in ALL_STATES {
            e.add(
                "lockstep_vm_state",
                "gauge",
                "The VM's state: 1 for the state it is in, 0 for the others.",
                &[("vm", name), ("state", state_name(state))],
                u64::from(vm.state == state),
            );
        }
        e.add(
            "lockstep_vm_vcpus",
            "gauge",
            "The VM's vCPUs.",
            &[("vm", name)],
            u64::from(vm.vcpus),
        );
        e.add(
            "lockstep_vm_memory_bytes",
            "gauge",
            "The VM's guest memory in bytes.",
            &[("vm", name)],
            vm.mem_size_mib.saturating_mul(MIB),
        );
        e.add(
            "lockstep_vm_boots_total",
            "counter",
            "Times the VM has been started.",
            &[("vm", name)],
            vm.boot_count,
        );
    }
    for vm in metrics {
        for (counter, value) in &vm.vcpu {
            let help = format!("vCPU counter {counter}, summed over the VM's vCPUs.");
            e.add(
                &counter_name("lockstep_vcpu", counter),
                "counter",
                &help,
                &[("vm", &vm.name)],
                *value,
            );
        }
        for device in &vm.devices {
            let mut labels = vec![("vm", vm.name.as_str()), ("kind", device.kind.as_str())];
            if let Some(id) = &device.id {
                labels.push(("id", id));
            }
            for (counter, value) in &device.counters {
                let help = format!("Device counter {counter}, per device (kind and id).");
                e.add(
                    &counter_name("lockstep_device", counter),
                    "counter",
                    &help,
                    &labels,
                    *value,
                );
            }
        }
    }
    e.text()
}

/// The migration families: how many migrations started and how they ended, by direction (a
/// host's opened listeners count as started incoming ones), bytes on the streams, the pause the
/// last completed outgoing one had, and auto-converge's throttle of each one under way. Written
/// apart from [`render`]: the host computes them from its registry of migrations.
pub fn render_migrations(migrations: &[MigrationInfo]) -> String {
    let mut e = Exposition::default();
    let ended = [
        ("completed", MigrationPhase::Completed, "completed"),
        (
            "failed",
            MigrationPhase::Failed,
            "failed (the source VM runs on, unless the error says the outcome is unknown)",
        ),
        (
            "cancelled",
            MigrationPhase::Cancelled,
            "cancelled by request",
        ),
    ];
    for direction in [MigrationDirection::Outgoing, MigrationDirection::Incoming] {
        let mine = || migrations.iter().filter(move |m| m.direction == direction);
        let labels = [("direction", direction.name())];
        e.add(
            "lockstep_migrations_started_total",
            "counter",
            "Live migrations started (outgoing: sends; incoming: listeners opened), by direction.",
            &labels,
            mine().count() as u64,
        );
        for (what, phase, help) in ended {
            e.add(
                &format!("lockstep_migrations_{what}_total"),
                "counter",
                &format!("Live migrations {help}, by direction."),
                &labels,
                mine().filter(|m| m.phase == phase).count() as u64,
            );
        }
        e.add(
            "lockstep_migrations_running",
            "gauge",
            "Live migrations under way, by direction.",
            &labels,
            mine().filter(|m| !m.phase.ended()).count() as u64,
        );
    }
    let bytes = |direction| {
        migrations
            .iter()
            .filter(|m| m.direction == direction)
            .map(|m| m.bytes)
            .sum::<u64>()
    };
    e.add(
        "lockstep_migration_sent_bytes_total",
        "counter",
        "Bytes sent on outgoing live-migration streams.",
        &[],
        bytes(MigrationDirection::Outgoing),
    );
    e.add(
        "lockstep_migration_received_bytes_total",
        "counter",
        "Bytes received on incoming live-migration streams.",
        &[],
        bytes(MigrationDirection::Incoming),
    );
    // Ids are given in order: the last completed is the one with the highest.
    let last = migrations
        .iter()
        .filter(|m| m.direction == MigrationDirection::Outgoing)
        .filter(|m| m.phase == MigrationPhase::Completed)
        .filter_map(|m| Some((m.id.parse::<u64>().ok()?, m.downtime_ms?)))
        .max_by_key(|(id, _)| *id);
    if let Some((_, downtime)) = last {
        e.add_text(
            "lockstep_migration_last_downtime_ms",
            "gauge",
            "The pause of the last completed outgoing live migration (source paused to destination running), milliseconds.",
            &[],
            format!("{downtime:.3}"),
        );
    }
    for m in migrations
        .iter()
        .filter(|m| m.direction == MigrationDirection::Outgoing && !m.phase.ended())
    {
        e.add(
            "lockstep_migration_throttle_percent",
            "gauge",
            "The share of time auto-converge keeps an outgoing migration's vCPUs paused, percent.",
            &[("vm", &m.vm), ("id", &m.id)],
            u64::from(m.throttle_percent),
        );
    }
    render_ft(&mut e, migrations);
    e.text()
}

/// The fault-tolerance families, from the pairings among the migrations: each pair's
/// protection, checkpoints and pause percentiles, and how many takeovers and planned failovers
/// this host has seen.
fn render_ft(e: &mut Exposition, migrations: &[MigrationInfo]) {
    let pairs = || migrations.iter().filter_map(|m| Some((m, m.ft.as_ref()?)));
    for (m, ft) in pairs() {
        let side = match m.direction {
            MigrationDirection::Outgoing => "primary",
            MigrationDirection::Incoming => "secondary",
        };
        let labels = [
            ("vm", m.vm.as_str()),
            ("pair", ft.pair.as_str()),
            ("side", side),
        ];
        e.add(
            "lockstep_ft_redundancy",
            "gauge",
            "A pair's protection as this side sees it: 2 full (the secondary is up to date), 1 degraded (the VM runs with no secondary), 0 lost (this side's copy ended).",
            &labels,
            match ft.redundancy {
                crate::migration::FtRedundancy::Full => 2,
                crate::migration::FtRedundancy::Degraded => 1,
                crate::migration::FtRedundancy::Lost => 0,
            },
        );
        e.add(
            "lockstep_ft_checkpoints_total",
            "counter",
            "Checkpoints taken (primary) or applied (secondary) by a pairing.",
            &labels,
            ft.epoch,
        );
        for (q, value) in [("0.5", ft.pause_p50_ms), ("0.99", ft.pause_p99_ms)] {
            e.add_text(
                "lockstep_ft_checkpoint_pause_ms",
                "gauge",
                "The guest's pause per checkpoint (the secondary: the time to apply one), quantiles of the last 1000, milliseconds.",
                &[labels[0], labels[1], labels[2], ("quantile", q)],
                format!("{value:.3}"),
            );
        }
        e.add_text(
            "lockstep_ft_replication_mib_per_second",
            "gauge",
            "Checkpoint bytes per second over the last second or so, MiB/s.",
            &labels,
            format!("{:.3}", ft.replication_mib_s),
        );
    }
    let roles = |role: &str| pairs().filter(|(_, ft)| ft.role == role).count() as u64;
    e.add(
        "lockstep_ft_takeovers_total",
        "counter",
        "Secondaries on this host that took their VM over from a silent primary.",
        &[],
        roles("primary (took over)"),
    );
    e.add(
        "lockstep_ft_failovers_total",
        "counter",
        "Planned failovers this host's primaries made to their secondaries.",
        &[],
        roles("primary (failed over)"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::DeviceMetrics;

    fn host() -> HostInfo {
        HostInfo {
            version: "0.1.0".into(),
            kvm_backend: "vmx".into(),
            kvm_backend_description: "Intel VT-x".into(),
            mem_mib: 2,
            cpus: 4,
            vm_count: 1,
        }
    }

    fn vm(name: &str, state: VmState) -> VmInfo {
        VmInfo {
            name: name.into(),
            state,
            vcpus: 2,
            mem_size_mib: 128,
            exit_reason: None,
            serial_log: None,
            console_socket: None,
            firecracker_socket: None,
            boot_count: 3,
        }
    }

    #[test]
    fn renders_families_with_help_type_and_labels() {
        let metrics = VmMetrics {
            name: "web".into(),
            vcpu: [("exits".to_string(), 10), ("pio_exits".to_string(), 4)].into(),
            devices: vec![
                DeviceMetrics {
                    kind: "block".into(),
                    id: Some("rootfs".into()),
                    counters: [("read_bytes".to_string(), 512)].into(),
                },
                DeviceMetrics {
                    kind: "rng".into(),
                    id: None,
                    counters: [("read_bytes".to_string(), 64)].into(),
                },
            ],
        };
        let text = render(&host(), &[vm("web", VmState::Running)], &[metrics]);
        let expected_lines = [
            "# HELP lockstep_device_read_bytes_total Device counter read_bytes, per device (kind and id).",
            "# TYPE lockstep_device_read_bytes_total counter",
            "lockstep_device_read_bytes_total{vm=\"web\",kind=\"block\",id=\"rootfs\"} 512",
            "lockstep_device_read_bytes_total{vm=\"web\",kind=\"rng\"} 64",
            "lockstep_host_info{version=\"0.1.0\",kvm_backend=\"vmx\"} 1",
            "# TYPE lockstep_host_memory_bytes gauge",
            "lockstep_host_memory_bytes 2097152",
            "lockstep_vcpu_exits_total{vm=\"web\"} 10",
            "lockstep_vcpu_pio_exits_total{vm=\"web\"} 4",
            "lockstep_vm_state{vm=\"web\",state=\"running\"} 1",
            "lockstep_vm_state{vm=\"web\",state=\"paused\"} 0",
            "# TYPE lockstep_vm_boots_total counter",
            "lockstep_vm_boots_total{vm=\"web\"} 3",
        ];
        for line in expected_lines {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Every family has exactly one HELP and one TYPE line, before its samples.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} described twice");
                current = name;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(rest.starts_with(&format!("{current} ")), "{line}");
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "sample outside its family: {line}");
            }
        }
    }

    #[test]
    fn escapes_labels_and_help() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
        let info = HostInfo {
            version: "1.0\"beta\"\n".into(),
            ..host()
        };
        let text = render(&info, &[], &[]);
        assert!(
            text.contains(
                "lockstep_host_info{version=\"1.0\\\"beta\\\"\\n\",kvm_backend=\"vmx\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn counter_names_become_metric_names() {
        assert_eq!(
            counter_name("lockstep_vcpu", "exits"),
            "lockstep_vcpu_exits_total"
        );
        assert_eq!(
            counter_name("lockstep_device", "rx-bytes"),
            "lockstep_device_rx_bytes_total"
        );
        assert_eq!(
            counter_name("lockstep_device", "errors_total"),
            "lockstep_device_errors_total"
        );
        assert_eq!(
            counter_name("lockstep_device", "9lives"),
            "lockstep_device__9lives_total"
        );
    }

    #[test]
    fn every_state_has_a_series() {
        let text = render(&host(), &[vm("a", VmState::ShuttingDown)], &[]);
        let states: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("lockstep_vm_state{"))
            .collect();
        assert_eq!(states.len(), ALL_STATES.len());
        assert!(states.contains(&"lockstep_vm_state{vm=\"a\",state=\"shutting_down\"} 1"));
        // The names match the JSON API's.
        for state in ALL_STATES {
            assert_eq!(serde_json::to_value(state).unwrap(), state_name(state));
        }
    }

    fn migration(
        id: &str,
        direction: MigrationDirection,
        phase: MigrationPhase,
        bytes: u64,
        downtime_ms: Option<f64>,
    ) -> MigrationInfo {
        MigrationInfo {
            id: id.into(),
            direction,
            vm: "web".into(),
            phase,
            round: 1,
            bytes,
            pages: 0,
            dirty_rate_mib_s: 0.0,
            link_rate_mib_s: 0.0,
            expected_downtime_ms: 0.0,
            remaining_bytes: 0,
            throttle_percent: 30,
            downtime_ms,
            elapsed_ms: 0.0,
            error: None,
            ft: None,
        }
    }

    #[test]
    fn migrations_are_counted_by_direction_and_outcome() {
        use MigrationDirection::{Incoming, Outgoing};
        use MigrationPhase::*;
        let text = render_migrations(&[
            migration("1", Outgoing, Completed, 1000, Some(4.25)),
            migration("2", Outgoing, Failed, 10, None),
            migration("3", Outgoing, Completed, 500, Some(7.5)),
            migration("4", Incoming, Cancelled, 0, None),
            migration("5", Incoming, Completed, 2000, None),
            migration("6", Outgoing, Precopy, 70, None),
        ]);
        for line in [
            "lockstep_migrations_started_total{direction=\"outgoing\"} 4",
            "lockstep_migrations_started_total{direction=\"incoming\"} 2",
            "lockstep_migrations_completed_total{direction=\"outgoing\"} 2",
            "lockstep_migrations_completed_total{direction=\"incoming\"} 1",
            "lockstep_migrations_failed_total{direction=\"outgoing\"} 1",
            "lockstep_migrations_failed_total{direction=\"incoming\"} 0",
            "lockstep_migrations_cancelled_total{direction=\"incoming\"} 1",
            "lockstep_migrations_running{direction=\"outgoing\"} 1",
            "# TYPE lockstep_migration_sent_bytes_total counter",
            "lockstep_migration_sent_bytes_total 1580",
            "lockstep_migration_received_bytes_total 2000",
            "# TYPE lockstep_migration_last_downtime_ms gauge",
            "lockstep_migration_last_downtime_ms 7.500",
            "lockstep_migration_throttle_percent{vm=\"web\",id=\"6\"} 30",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Nothing ran: every counter is there at 0, and no downtime is made up.
        let empty = render_migrations(&[]);
        assert!(empty.contains("lockstep_migrations_started_total{direction=\"outgoing\"} 0"));
        assert!(!empty.contains("last_downtime"), "{empty}");
        assert!(empty.contains("lockstep_ft_takeovers_total 0"), "{empty}");
    }

    #[test]
    fn pairings_have_their_protection_and_checkpoints() {
        use crate::migration::{FtRedundancy, FtStatus, MigrationDirection::*, MigrationPhase::*};
        let ft = |role: &str, redundancy| FtStatus {
            role: role.into(),
            pair: "p".into(),
            epoch: 42,
            committed_epoch: Some(41),
            since_commit_ms: None,
            pause_p50_ms: 1.25,
            pause_p99_ms: 3.5,
            replication_mib_s: 2.0,
            arbiter_epoch: 1,
            redundancy,
        };
        let mut primary = migration("1", Outgoing, Protecting, 10, None);
        primary.ft = Some(ft("primary", FtRedundancy::Full));
        let mut took = migration("2", Incoming, Completed, 10, None);
        took.ft = Some(ft("primary (took over)", FtRedundancy::Degraded));
        let text = render_migrations(&[primary, took]);
        for line in [
            "lockstep_ft_redundancy{vm=\"web\",pair=\"p\",side=\"primary\"} 2",
            "lockstep_ft_redundancy{vm=\"web\",pair=\"p\",side=\"secondary\"} 1",
            "lockstep_ft_checkpoints_total{vm=\"web\",pair=\"p\",side=\"primary\"} 42",
            "lockstep_ft_checkpoint_pause_ms{vm=\"web\",pair=\"p\",side=\"primary\",quantile=\"0.99\"} 3.500",
            "lockstep_ft_takeovers_total 1",
            "lockstep_ft_failovers_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }
}
