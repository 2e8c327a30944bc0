//! Migration progress on the terminal: while `lockstep host` runs with its standard error on a
//! terminal, one line per migration under way (phase, round, percent, link rate, expected
//! downtime), redrawn in place four times a second; a migration that ends leaves its last line
//! (outcome, time, downtime or error) above them. Nothing is written when standard error is not
//! a terminal. A log line clears the live lines first ([`clear_for_log_line`]), and they are
//! drawn again below it at the next redraw.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_api::control::HostControl;
use lockstep_api::migration::{MigrationInfo, MigrationPhase};

/// How often the lines are redrawn.
const TICK: Duration = Duration::from_millis(250);

/// Live lines on the terminal now (0 when the thread does not run).
static DRAWN: AtomicUsize = AtomicUsize::new(0);

/// What a log line written to standard error must start with: the escape that clears the live
/// progress lines, when there are some (the next redraw puts them back below the log line).
pub fn clear_for_log_line() -> Option<String> {
    match DRAWN.swap(0, Ordering::AcqRel) {
        0 => None,
        n => Some(format!("\x1b[{n}F\x1b[J")),
    }
}

/// Starts the progress thread when standard error is a terminal; returns whether it did.
pub fn spawn_terminal_progress(host: Arc<dyn HostControl>) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDERR_FILENO) } != 1 {
        return false;
    }
    let spawned = std::thread::Builder::new()
        .name("migration-progress".into())
        .spawn(move || {
            lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Main);
            let mut screen = Screen::default();
            loop {
                std::thread::sleep(TICK);
                let migrations = host.list_migrations();
                if DRAWN.load(Ordering::Acquire) == 0
                    && !migrations.iter().any(|m| screen.wanted(m))
                {
                    continue;
                }
                let memory: HashMap<String, u64> = host
                    .list_vms()
                    .into_iter()
                    .map(|vm| (vm.name, vm.mem_size_mib << 20))
                    .collect();
                let mut err = std::io::stderr().lock();
                // A log line may have cleared the live lines since the last redraw.
                screen.drawn = DRAWN.load(Ordering::Acquire);
                let text = screen.draw(&migrations, &memory);
                // A terminal that cannot be written to only loses the progress lines.
                let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
                DRAWN.store(screen.drawn, Ordering::Release);
            }
        });
    if let Err(e) = spawned {
        log::warn!("no migration progress on the terminal: {e}");
        return false;
    }
    true
}

/// What is on the screen: the live lines drawn last (erased before the next drawing) and the
/// migrations they were for.
#[derive(Default)]
struct Screen {
    drawn: usize,
    live: HashSet<String>,
}

impl Screen {
    /// Whether `m` has a line to show: under way, or ended since the last drawing.
    fn wanted(&self, m: &MigrationInfo) -> bool {
        !m.phase.ended() || self.live.contains(&m.id)
    }

    /// The text that replaces the live lines with `migrations`.
    fn draw(&mut self, migrations: &[MigrationInfo], memory: &HashMap<String, u64>) -> String {
        let mut out = String::new();
        if self.drawn > 0 {
            // To the start of the first live line, and clear to the end of the screen.
            out.push_str(&format!("\x1b[{}F\x1b[J", self.drawn));
        }
        // Those that ended since: their last line stays.
        for m in migrations
            .iter()
            .filter(|m| m.phase.ended() && self.live.contains(&m.id))
        {
            out.push_str(&progress_line(m, memory.get(&m.vm).copied()));
            out.push('\n');
        }
        self.live.clear();
        self.drawn = 0;
        for m in migrations.iter().filter(|m| !m.phase.ended()) {
            out.push_str(&progress_line(m, memory.get(&m.vm).copied()));
            out.push('\n');
            self.live.insert(m.id.clone());
            self.drawn += 1;
        }
        out
    }
}

/// One migration's line: `migration 3 outgoing web: precopy round 2, 84%, 812.3 MiB/s, expected
/// downtime 3.1 ms`, or how it ended.
pub fn progress_line(m: &MigrationInfo, memory_bytes: Option<u64>) -> String {
    let head = format!("migration {} {} {}", m.id, m.direction.name(), m.vm);
    let secs = m.elapsed_ms / 1e3;
    match m.phase {
        MigrationPhase::Completed => match m.downtime_ms {
            Some(d) => format!("{head}: completed in {secs:.2} s, downtime {d:.1} ms"),
            None => format!("{head}: completed in {secs:.2} s"),
        },
        MigrationPhase::Failed | MigrationPhase::Cancelled => format!(
            "{head}: {} after {secs:.2} s: {}",
            m.phase.name(),
            m.error.as_deref().unwrap_or("no reason given")
        ),
        phase => {
            let mut line = format!(
                "{head}: {} round {}, {}%, {:.1} MiB/s, expected downtime {:.1} ms",
                phase.name(),
                m.round,
                m.percent_complete(memory_bytes),
                m.link_rate_mib_s,
                m.expected_downtime_ms
            );
            if m.throttle_percent > 0 {
                line.push_str(&format!(", throttle {}%", m.throttle_percent));
            }
            line
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::migration::MigrationDirection;

    fn info(id: &str, phase: MigrationPhase) -> MigrationInfo {
        MigrationInfo {
            id: id.into(),
            direction: MigrationDirection::Outgoing,
            vm: "web".into(),
            phase,
            round: 2,
            bytes: 0,
            pages: 0,
            dirty_rate_mib_s: 1.0,
            link_rate_mib_s: 812.34,
            expected_downtime_ms: 3.06,
            remaining_bytes: 0,
            throttle_percent: 0,
            downtime_ms: Some(4.25),
            elapsed_ms: 1234.0,
            error: None,
            ft: None,
        }
    }

    #[test]
    fn lines_say_phase_round_percent_rate_and_downtime() {
        assert_eq!(
            progress_line(&info("3", MigrationPhase::Precopy), Some(1 << 30)),
            "migration 3 outgoing web: precopy round 2, 84%, 812.3 MiB/s, expected downtime 3.1 ms"
        );
        assert_eq!(
            progress_line(&info("3", MigrationPhase::Completed), None),
            "migration 3 outgoing web: completed in 1.23 s, downtime 4.2 ms"
        );
        let mut failed = info("4", MigrationPhase::Failed);
        failed.error = Some("cannot connect".into());
        assert_eq!(
            progress_line(&failed, None),
            "migration 4 outgoing web: failed after 1.23 s: cannot connect"
        );
    }

    #[test]
    fn a_log_line_clears_the_live_lines_once() {
        DRAWN.store(2, Ordering::Release);
        assert_eq!(clear_for_log_line().as_deref(), Some("\x1b[2F\x1b[J"));
        assert_eq!(clear_for_log_line(), None);
    }

    #[test]
    fn live_lines_are_redrawn_in_place_and_ended_ones_stay() {
        let memory = Default::default();
        let mut screen = Screen::default();
        let first = screen.draw(&[info("1", MigrationPhase::Precopy)], &memory);
        assert!(
            first.starts_with("migration 1 ") && first.ends_with('\n'),
            "{first}"
        );
        assert_eq!(first.lines().count(), 1);
        // Two under way: the one line drawn is replaced by two.
        let both = [
            info("1", MigrationPhase::Precopy),
            info("2", MigrationPhase::Switching),
        ];
        let second = screen.draw(&both, &memory);
        assert!(second.starts_with("\x1b[1F\x1b[J"), "{second:?}");
        assert_eq!(screen.drawn, 2);
        // One ends: its final line is written once, above the live one.
        let third = screen.draw(
            &[
                info("1", MigrationPhase::Completed),
                info("2", MigrationPhase::Switching),
            ],
            &memory,
        );
        let lines: Vec<&str> = third.lines().collect();
        assert!(lines[0].starts_with("\x1b[2F\x1b[J"), "{third:?}");
        assert!(
            lines[0].contains("migration 1 outgoing web: completed"),
            "{third:?}"
        );
        assert!(lines[1].starts_with("migration 2 "), "{third:?}");
        assert_eq!(screen.drawn, 1);
        let fourth = screen.draw(&[info("2", MigrationPhase::Completed)], &memory);
        assert!(fourth.contains("migration 2 outgoing web: completed"));
        assert_eq!(screen.drawn, 0);
        assert!(screen.live.is_empty());
    }
}
