//! A target hit by a signal every 100 µs (tests/fixtures/apply-signals): the thread
//! livecare borrows for its remote syscalls, and stops for the commit, keeps taking
//! signal-delivery stops in between. Every patch and unpatch must take, no signal may
//! turn into a crash or a stuck thread, and the handler must keep running.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags};
use testkit::{Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// The handler's count in a `version=N alarms=M` line.
fn alarms(line: &str) -> Result<u64> {
    line.split("alarms=")
        .nth(1)
        .context("no alarms= in the line")?
        .trim()
        .parse()
        .with_context(|| format!("line {line:?}"))
}

#[test]
fn patch_and_unpatch_under_a_signal_storm_take_effect_and_lose_no_handler_run() -> Result<()> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-signals"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "storm", &[])?;
    let patch = b.patch(&exe, "patched.c", "0001")?;
    let mut prog = Running::start(&exe.path, &[])?;
    let first = alarms(&prog.wait_for("version=1 ", WAIT)?)?;
    let pid = prog.pid().to_string();
    let mut last = first;
    for cycle in 0..20 {
        (|| -> Result<()> {
            ok(&lc(&["patch", "-p", &pid, patch.path.to_str().unwrap()]))?;
            prog.drain();
            prog.wait_for("version=2 ", WAIT)?;
            ok(&lc(&["unpatch", "-p", &pid]))?;
            prog.drain();
            let line = prog.wait_for("version=1 ", WAIT)?;
            let now = alarms(&line)?;
            ensure!(now > last, "the handler stopped running: {last} then {now}");
            last = now;
            ensure!(prog.is_alive(), "the target died");
            Ok(())
        })()
        .with_context(|| format!("cycle {cycle}"))?;
    }
    // Not stopped, not traced, and still taking its signals.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(status.contains("TracerPid:\t0"), "{status}");
    std::thread::sleep(Duration::from_millis(50));
    prog.drain();
    let later = alarms(&prog.wait_for("version=1 ", WAIT)?)?;
    ensure!(later > last, "no signal handled after the last unpatch");
    Ok(())
}
