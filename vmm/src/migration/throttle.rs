//! Auto-converge: while a guest dirties memory faster than the link sends it, its vCPUs are
//! paused for a growing share of every 100 ms, so that pre-copy can catch up. The pauses go
//! straight to the VM (the host keeps reporting it as running); stopping the throttle leaves
//! the VM running.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::spawn_thread;
use crate::vm::{VmCommand, VmControl};

const PERIOD_MS: u64 = 100;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// The first step, the step after it, and the most (the guest always gets some time).
const FIRST_STEP: u32 = 30;
const STEP: u32 = 20;
const MAX_PERCENT: u32 = 99;

/// A running throttle.
pub(super) struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    /// Starts throttling `control`'s VM (at 0 % until [`Throttle::step_up`]).
    pub(super) fn start(control: VmControl, name: String) -> std::io::Result<Throttle> {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = spawn_thread(name, move || {
            while !s.load(Ordering::SeqCst) {
                let share = u64::from(p.load(Ordering::SeqCst));
                if share == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                std::thread::sleep(Duration::from_millis(PERIOD_MS * (100 - share) / 100));
                if s.load(Ordering::SeqCst)
                    || control.call(VmCommand::Pause, COMMAND_TIMEOUT).is_err()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(PERIOD_MS * share / 100));
                if control.call(VmCommand::Resume, COMMAND_TIMEOUT).is_err() {
                    break;
                }
            }
        })?;
        Ok(Throttle {
            percent,
            stop,
            thread: Some(thread),
        })
    }

    /// Slows the guest down one more step; returns the new share.
    pub(super) fn step_up(&self) -> u32 {
        let now = self.percent.load(Ordering::SeqCst);
        let next = if now == 0 { FIRST_STEP } else { now + STEP }.min(MAX_PERCENT);
        self.percent.store(next, Ordering::SeqCst);
        next
    }
}

impl Drop for Throttle {
    /// Stops throttling; the VM is running again when this returns.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
