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

/// Total µs that every CPU has spent in its cpuidle "POLL" state; `None` without one.
fn poll_time_us() -> Option<u64> {
    let mut total = None;
    for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("cpu") || !name[3..].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let state = cpu.path().join("cpuidle/state0");
        match std::fs::read_to_string(state.join("name")) {
            Ok(n) if n.trim() == "POLL" => {}
            _ => continue,
        }
        let t: u64 = std::fs::read_to_string(state.join("time"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        *total.get_or_insert(0) += t;
    }
    total
}

/// µs of POLL time over [`WINDOW`], during which this thread only sleeps.
fn polled_over_window() -> u64 {
    let before = poll_time_us().unwrap_or(0);
    std::thread::sleep(WINDOW);
    poll_time_us().unwrap_or(0).saturating_sub(before)
}

#[test]
fn idle_cpus_poll_while_a_process_is_held_and_halt_again_once_it_runs() -> Result<()> {
    if poll_time_us().is_none() || !std::path::Path::new("/dev/cpu_dma_latency").exists() {
        eprintln!("skipped: no cpuidle POLL state or no /dev/cpu_dma_latency on this machine");
        return Ok(());
    }
    let s = Scratch::new()?;
    let src = testkit::fixture_dir("process-idle-poll").join("spin.c");
    let exe = testkit::gcc(&[&src], &s.join("spin"), Link::Pie, &["-O2"])?;
    let mut p = Running::start(&exe, &[])?;
    p.wait_for("ready", WAIT)?;
    let pid = Pid(p.pid() as i32);

    let mut threads = ThreadSet::seize(pid)?;
    threads.keep_cpus_warm(false);
    let before = polled_over_window();
    threads.interrupt_all()?;
    let held = polled_over_window();
    threads.resume_all()?;
    let after = polled_over_window();
    drop(threads);
    eprintln!("POLL µs over {WINDOW:?}: before {before}, held {held}, after {after}");

    // The target is stopped and this thread sleeps: at least one CPU is idle for most
    // of the window, polling.
    ensure!(
        held >= WINDOW.as_micros() as u64 / 2,
        "idle CPUs polled only {held} µs of a {WINDOW:?} pause"
    );
    ensure!(
        after < held / 4 && before < held / 4,
        "idle CPUs still polled outside the pause ({before} µs before, {after} after, {held} held)"
    );
    p.drain();
    p.wait_for("count", WAIT)?;
    ensure!(p.is_alive(), "the target died");
    Ok(())
}
