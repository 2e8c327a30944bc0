//! Receive moderation: when to stop waking the event loop for each frame the tap receives.
//!
//! Woken for every frame, the event loop spends more on wake-ups than on frames once they
//! arrive back to back, and the driver gets them one by one. So when frames come in a burst, or
//! faster than one per [`TICK_MIN`], the loop stops watching the tap for input and reads it on
//! a periodic timer instead. The period adapts as a NIC's adaptive interrupt coalescing does:
//! it doubles while each tick delivers at least [`DENSE`] frames, halves when one delivers
//! fewer, and stays within [`TICK_MIN`]..=[`TICK_MAX`]; a tick that delivers nothing (the tap
//! is empty, or the guest has no buffers and its notification will resume reception) ends it.
//! A lone frame (a ping, a request) is taken at once; a frame of a stream waits at most one
//! period. This is host-side pacing only: nothing of it is guest-visible state.

use std::time::{Duration, Instant};

/// The shortest period, and the gap between frames below which they count as back to back.
pub(super) const TICK_MIN: Duration = Duration::from_micros(25);
/// The longest period (the most a frame waits in the tap while moderated).
pub(super) const TICK_MAX: Duration = Duration::from_micros(200);
/// Frames found waiting by one woken pass that start moderation.
const BURST: u64 = 2;
/// Frames per tick that lengthen the period.
const DENSE: u64 = 4;

/// What the receive timer must do after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerChange {
    /// Nothing.
    Keep,
    /// Tick with this period from now on.
    Arm(Duration),
    /// Stop ticking: the tap is watched again.
    Stop,
}

/// The moderation state of one interface.
#[derive(Debug, Default)]
pub(super) struct RxModeration {
    /// The timer's period while moderated.
    tick: Option<Duration>,
    /// When a woken pass last delivered a frame.
    last_delivery: Option<Instant>,
}

impl RxModeration {
    /// Whether the timer, not the tap, drives reception.
    pub(super) fn is_on(&self) -> bool {
        self.tick.is_some()
    }

    /// After a pass woken by the tap or by the driver at `now`, which delivered `delivered`
    /// frames and emptied the tap if `drained`.
    pub(super) fn after_woken_pass(
        &mut self,
        now: Instant,
        delivered: u64,
        drained: bool,
    ) -> TimerChange {
        if self.is_on() || delivered == 0 {
            return TimerChange::Keep;
        }
        let back_to_back = self
            .last_delivery
            .is_some_and(|last| now.saturating_duration_since(last) < TICK_MIN);
        self.last_delivery = Some(now);
        // A pass that stopped for want of guest buffers resumes on the driver's notification.
        if drained && (delivered >= BURST || back_to_back) {
            self.tick = Some(TICK_MIN);
            TimerChange::Arm(TICK_MIN)
        } else {
            TimerChange::Keep
        }
    }

    /// After a tick's pass, which delivered `delivered` frames.
    pub(super) fn after_tick(&mut self, delivered: u64) -> TimerChange {
        let Some(tick) = self.tick else {
            return TimerChange::Keep;
        };
        let next = match delivered {
            0 => return self.stop(),
            n if n >= DENSE => (tick * 2).min(TICK_MAX),
            _ => (tick / 2).max(TICK_MIN),
        };
        if next == tick {
            TimerChange::Keep
        } else {
            self.tick = Some(next);
            TimerChange::Arm(next)
        }
    }

    /// Ends moderation (device reset, or a timer that cannot be set).
    pub(super) fn stop(&mut self) -> TimerChange {
        match self.tick.take() {
            Some(_) => TimerChange::Stop,
            None => TimerChange::Keep,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn lone_frames_are_never_moderated() {
        let mut m = RxModeration::default();
        let t0 = Instant::now();
        // A ping a millisecond: one frame per wake-up, far apart.
        for i in 0..10 {
            assert_eq!(
                m.after_woken_pass(t0 + us(1000 * i), 1, true),
                TimerChange::Keep
            );
        }
        assert!(!m.is_on());
        // Nothing delivered (no buffers, empty tap) never starts it either.
        assert_eq!(
            m.after_woken_pass(t0 + us(20_000), 0, true),
            TimerChange::Keep
        );
        assert!(!m.is_on());
    }

    #[test]
    fn a_burst_or_back_to_back_frames_start_it() {
        let mut m = RxModeration::default();
        let t0 = Instant::now();
        assert_eq!(m.after_woken_pass(t0, 3, true), TimerChange::Arm(TICK_MIN));
        assert!(m.is_on());
        // While on, woken passes (the driver's notifications) change nothing.
        assert_eq!(m.after_woken_pass(t0 + us(1), 5, true), TimerChange::Keep);

        let mut m = RxModeration::default();
        assert_eq!(m.after_woken_pass(t0, 1, true), TimerChange::Keep);
        assert_eq!(
            m.after_woken_pass(t0 + us(5), 1, true),
            TimerChange::Arm(TICK_MIN)
        );

        // A pass cut short by the guest's lack of buffers waits for its notification instead.
        let mut m = RxModeration::default();
        assert_eq!(m.after_woken_pass(t0, 64, false), TimerChange::Keep);
        assert!(!m.is_on());
    }

    #[test]
    fn the_period_follows_the_rate_and_an_empty_tick_ends_it() {
        let mut m = RxModeration::default();
        m.after_woken_pass(Instant::now(), 2, true);
        // Dense ticks double the period up to the cap.
        let mut periods = Vec::new();
        for _ in 0..6 {
            if let TimerChange::Arm(p) = m.after_tick(10) {
                periods.push(p);
            }
        }
        assert_eq!(periods, [us(50), us(100), us(200)]);
        assert_eq!(m.after_tick(10), TimerChange::Keep);
        // Sparse ticks halve it down to the floor.
        assert_eq!(m.after_tick(1), TimerChange::Arm(us(100)));
        assert_eq!(m.after_tick(2), TimerChange::Arm(us(50)));
        assert_eq!(m.after_tick(3), TimerChange::Arm(TICK_MIN));
        assert_eq!(m.after_tick(1), TimerChange::Keep);
        // An empty tick stops the timer; a stale tick after that changes nothing.
        assert_eq!(m.after_tick(0), TimerChange::Stop);
        assert!(!m.is_on());
        assert_eq!(m.after_tick(0), TimerChange::Keep);
        assert_eq!(m.stop(), TimerChange::Keep);
    }
}
