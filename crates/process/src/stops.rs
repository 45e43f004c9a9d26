//! Every stop livecare made of a target's threads in this run, for the `--json`
//! reports (`livecare bench pause` matches them against the gaps the target saw, to
//! tell which phase of a command stalled it longest).

use std::sync::Mutex;

/// One stop: all of a process's threads (a pause) or one borrowed thread.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Process.
    pub pid: i32,
    /// What it was for: `commit`, `reclaim`, `<phase> borrow <syscall>`, …
    pub phase: String,
    /// First INTERRUPT and last resume, `CLOCK_MONOTONIC` ns.
    pub window_ns: [u64; 2],
}

static STOPS: Mutex<Vec<Stop>> = Mutex::new(Vec::new());

/// Most stops kept (a long `-p all` run keeps its first ones).
const MAX: usize = 100_000;

/// Notes one stop.
pub fn record(pid: i32, phase: String, window_ns: [u64; 2]) {
    if let Ok(mut s) = STOPS.lock() {
        if s.len() < MAX {
            s.push(Stop {
                pid,
                phase,
                window_ns,
            });
        }
    }
}

/// The stops noted so far, in order.
pub fn all() -> Vec<Stop> {
    STOPS.lock().map(|s| s.clone()).unwrap_or_default()
}
