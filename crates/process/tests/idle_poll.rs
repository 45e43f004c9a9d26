//! The CPUs are kept from halting during a pause, and only then: while a `ThreadSet`
//! that keeps them warm holds a real process stopped, idle CPUs poll (the kernel's
//! cpuidle POLL state accumulates time); once the threads run again, they halt as
//! before. Alone in its test binary: another pause elsewhere would poll too.

use std::time::Duration;

use anyhow::{ensure, Result};
use livecare_process::{Pid, ThreadSet};
use testkit::{Link, Running, Scratch};

const WAIT: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_millis(150);

/// Total µs that every CPU has spent idle: (in its cpuidle "POLL" state, in any
/// state); `None` without a POLL state.
fn idle_time_us() -> Option<(u64, u64)> {
    let mut total: Option<(u64, u64)> = None;
    for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("cpu") || !name[3..].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let idle = cpu.path().join("cpuidle");
        match std::fs::read_to_string(idle.join("state0/name")) {
            Ok(n) if n.trim() == "POLL" => {}
            _ => continue,
        }
        let (poll, all) = total.get_or_insert((0, 0));
        for state in std::fs::read_dir(&idle).ok()?.flatten() {
            let t: u64 = std::fs::read_to_string(state.path().join("time"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            *all += t;
            if state.file_name() == "state0" {
                *poll += t;
            }
        }
    }
    total
}

/// µs of idle time over [`WINDOW`], during which this thread only sleeps: (polled,
/// in any state).
fn idle_over_window() -> (u64, u64) {
    let before = idle_time_us().unwrap_or((0, 0));
    std::thread::sleep(WINDOW);
    let after = idle_time_us().unwrap_or((0, 0));
    (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    )
}

/// Least idle time (µs, all CPUs) in a window for its share of polling to mean
/// anything: on a machine kept busy by other work no CPU may be idle at all.
const MIN_IDLE: u64 = 10_000;

#[test]
fn idle_cpus_poll_while_a_process_is_held_and_halt_again_once_it_runs() -> Result<()> {
    if idle_time_us().is_none() || !std::path::Path::new("/dev/cpu_dma_latency").exists() {
        testkit::skip_banner(
            "a cpuidle POLL state and /dev/cpu_dma_latency (this machine has not)",
        );
        return Ok(());
    }
    let s = Scratch::new()?;
    let src = testkit::fixture_dir("process-idle-poll").join("spin.c");
    let exe = testkit::gcc(&[&src], &s.join("spin"), Link::Pie, &["-O2"])?;
    let mut p = Running::start(&exe, &[])?;
    p.wait_for("ready", WAIT)?;
    let pid = Pid(p.pid() as i32);

    // The share of idle time spent polling, before, during and after a pause. Tried a
    // few times: other work on the machine may leave no CPU idle in some window.
    let mut observed = false;
    for attempt in 1..=5 {
        let mut threads = ThreadSet::seize(pid)?;
        threads.keep_cpus_warm(false);
        let before = idle_over_window();
        threads.interrupt_all()?;
        let held = idle_over_window();
        threads.resume_all()?;
        let after = idle_over_window();
        drop(threads);
        eprintln!(
            "attempt {attempt}: (polled, idle) µs over {WINDOW:?}: before {before:?}, \
             held {held:?}, after {after:?}"
        );
        if [before, held, after].iter().any(|w| w.1 < MIN_IDLE) {
            continue;
        }
        observed = true;
        // Held: the request makes every idle CPU poll instead of halting.
        ensure!(
            held.0 * 10 >= held.1 * 8,
            "idle CPUs polled only {} of {} idle µs during a pause",
            held.0,
            held.1
        );
        ensure!(
            before.0 * 4 < before.1 && after.0 * 4 < after.1,
            "idle CPUs still polled outside the pause ({before:?} before, {after:?} after)"
        );
        break;
    }
    if !observed {
        eprintln!("not observed: some window had under {MIN_IDLE} µs of idle CPU in every attempt");
    }
    p.drain();
    p.wait_for("count", WAIT)?;
    ensure!(p.is_alive(), "the target died");
    Ok(())
}
