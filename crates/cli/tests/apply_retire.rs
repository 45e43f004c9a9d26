//! Unpatch never unmaps memory the process may still use: a removed patch's region
//! stays mapped and inactive ("retired", listed by `info`) until a conservative scan
//! of every thread's registers and of the process's writable memory proves nothing
//! points into it (fixture: tests/fixtures/unpatch-retire).

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::Value;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    _s: Scratch,
    exe: Object,
    tail: Patch,
    hook: Patch,
    signal: Patch,
}

fn build() -> Result<Fixture> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("unpatch-retire"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "retire", &[])?;
    let tail = b.patch(&exe, "patched-tail.c", "tail")?;
    let hook = b.patch(&exe, "patched-hook.c", "hook")?;
    let signal = b.patch(&exe, "patched-signal.c", "signal")?;
    Ok(Fixture {
        _s: s,
        exe,
        tail,
        hook,
        signal,
    })
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// `info -p PID --json` for one process.
fn info(pid: u32) -> Result<Value> {
    let out = ok(&lc(&["info", "-p", &pid.to_string(), "--json"]))?;
    Ok(serde_json::from_str::<Value>(&out)?[0].clone())
}

/// The retired regions `info` lists: (address, size).
fn retired(pid: u32) -> Result<Vec<(u64, u64)>> {
    let i = info(pid)?;
    let list = i["retired"].as_array().context("no retired list")?;
    Ok(list
        .iter()
        .map(|r| {
            (
                r["addr"].as_u64().unwrap_or(0),
                r["total_len"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Waits for a tick line of the target that shows `render` and `hook` as wanted.
fn wait_tick(t: &mut Running, render: &str, hook: &str) -> Result<()> {
    t.drain();
    let line = t.wait_for(&format!("tick {render} hook={hook}"), WAIT)?;
    ensure!(line.ends_with("bad=0"), "a render was garbled: {line}");
    Ok(())
}

fn alive(t: &mut Running) -> Result<()> {
    ensure!(t.is_alive(), "target died; last lines {:?}", t.tail(5));
    Ok(())
}

/// Patch and unpatch a tail call of snprintf whose format string is in the patch,
/// while 3 busy threads run it: the target never dies, and the regions do not pile up
/// (those proven unreferenced are reclaimed). LIVECARE_CYCLES sets the number of
/// cycles (default 20).
#[test]
fn unpatching_a_tail_call_into_libc_with_busy_threads_never_kills_the_target() -> Result<()> {
    let cycles: usize = std::env::var("LIVECARE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let f = build()?;
    let mut t = Running::start(&f.exe.path, &["3"])?;
    wait_tick(&mut t, "old", "1")?;
    let pid = t.pid().to_string();
    let (mut most_retired, mut kept_at_unpatch) = (0, 0);
    for cycle in 0..cycles {
        (|| -> Result<()> {
            ok(&lc(&["patch", "-p", &pid, p(&f.tail.path)]))?;
            wait_tick(&mut t, "new", "1")?;
            let out = ok(&lc(&["unpatch", "-p", &pid]))?;
            kept_at_unpatch += out.contains("kept mapped") as usize;
            alive(&mut t)?;
            wait_tick(&mut t, "old", "1")?;
            alive(&mut t)?;
            most_retired = most_retired.max(retired(t.pid())?.len());
            Ok(())
        })()
        .with_context(|| format!("cycle {cycle}"))?;
    }
    eprintln!(
        "{cycles} cycles: {kept_at_unpatch} unpatch(es) kept the region retired, at most \
         {most_retired} retired region(s) at a time"
    );
    // Reclaimed as soon as proven unreferenced: they do not accumulate.
    ensure!(
        most_retired <= 3,
        "{most_retired} regions retired at once: none is ever reclaimed"
    );
    Ok(())
}

/// A patch stores a pointer to its new function in a global callback; after the
/// unpatch the program still calls it: the retired region keeps it valid, `info`
/// lists the region with its size, and later patches still work.
#[test]
fn a_callback_into_an_unpatched_patch_stays_callable() -> Result<()> {
    let f = build()?;
    let mut t = Running::start(&f.exe.path, &["1"])?;
    wait_tick(&mut t, "old", "1")?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&f.hook.path)]))?;
    wait_tick(&mut t, "old", "1002")?;
    let applied = info(t.pid())?;
    let region = applied["objects"][0]["patches"][0]["addr"]
        .as_u64()
        .context("no applied patch")?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    // set_hook() is the original again, but the program keeps the pointer it stored.
    std::thread::sleep(Duration::from_millis(100));
    wait_tick(&mut t, "old", "1002")?;
    alive(&mut t)?;
    let r = retired(t.pid())?;
    ensure!(
        r.len() == 1 && r[0].0 == region && r[0].1 >= 4096,
        "info does not list the retired region {region:#x}: {r:x?}"
    );
    let text = ok(&lc(&["info", "-p", &pid]))?;
    ensure!(
        text.contains("retired") && text.contains(&format!("{region:#x}")),
        "{text}"
    );
    // The same patch again, then another: both apply and unpatch as usual, and the
    // region the hook points into stays (the pointer is still stored).
    let mut hook_region = region;
    for patch in [&f.hook, &f.tail, &f.hook] {
        ok(&lc(&["patch", "-p", &pid, p(&patch.path)]))?;
        if std::ptr::eq(patch, &f.hook) {
            hook_region = info(t.pid())?["objects"][0]["patches"][0]["addr"]
                .as_u64()
                .context("no applied patch")?;
            // The new set_hook has run: the hook points into the new region.
            wait_tick(&mut t, "old", "1002")?;
        }
        ok(&lc(&["unpatch", "-p", &pid]))?;
        alive(&mut t)?;
    }
    wait_tick(&mut t, "old", "1002")?;
    let r = retired(t.pid())?;
    ensure!(
        r.iter().any(|x| x.0 == hook_region),
        "the region the hook points into ({hook_region:#x}) is not kept: {r:x?}"
    );
    Ok(())
}

/// True when `pid` catches signal `sig` (its bit in `SigCgt` of /proc/PID/status).
fn catches(pid: u32, sig: i32) -> Result<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .context("no SigCgt")?;
    Ok(u64::from_str_radix(mask.trim(), 16)? & (1 << (sig - 1)) != 0)
}

/// A patch installs a signal handler of its own (a pointer only the kernel holds):
/// after the unpatch its region stays, and the signal is still handled.
#[test]
fn a_signal_handler_installed_by_an_unpatched_patch_keeps_its_region() -> Result<()> {
    let f = build()?;
    let mut t = Running::start(&f.exe.path, &["1"])?;
    wait_tick(&mut t, "old", "1")?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&f.signal.path)]))?;
    let deadline = std::time::Instant::now() + WAIT;
    while !catches(t.pid(), libc::SIGUSR2)? {
        ensure!(
            std::time::Instant::now() < deadline,
            "handler never installed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let region = info(t.pid())?["objects"][0]["patches"][0]["addr"]
        .as_u64()
        .context("no applied patch")?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    // A later unpatch tries the reclaim again: the handler still holds the region.
    for _ in 0..2 {
        ok(&lc(&["patch", "-p", &pid, p(&f.tail.path)]))?;
        ok(&lc(&["unpatch", "-p", &pid]))?;
    }
    let r = retired(t.pid())?;
    ensure!(
        r.iter().any(|x| x.0 == region),
        "the region of the installed handler ({region:#x}) was not kept: {r:x?}"
    );
    // SAFETY: kill(2) on our own child with a valid signal number.
    ensure!(unsafe { libc::kill(t.pid() as i32, libc::SIGUSR2) } == 0);
    t.drain();
    t.wait_for("sig=1000", WAIT)?;
    alive(&mut t)?;
    Ok(())
}

/// Target of tests/fixtures/reclaim-race: a pointer into the patch keeps moving
/// between a global and a thread's stack while livecare scans (see orig.c).
fn build_race() -> Result<(Scratch, Object, Patch, Patch)> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("reclaim-race"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "race", &[])?;
    let patch = b.patch(&exe, "patched.c", "race")?;
    let epoll = b.patch(&exe, "patched-epoll.c", "epoll")?;
    Ok((s, exe, patch, epoll))
}

/// A pointer into a removed patch that the program keeps moving while the reclaim's
/// scan runs (it can be missed by a scan of the running process) still keeps the
/// region: the confirming scan in the stop sees it. And the regions no pointer
/// reaches are still reclaimed: after many cycles only a few stay retired.
/// LIVECARE_CYCLES sets the number of cycles (default 24).
#[test]
fn a_pointer_moved_during_the_scan_keeps_its_region_and_the_others_are_reclaimed() -> Result<()> {
    let cycles: usize = std::env::var("LIVECARE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let (_s, exe, patch, _) = build_race()?;
    let mut t = Running::start(&exe.path, &[])?;
    t.wait_for("tick hook=1 ", WAIT)?;
    let pid = t.pid().to_string();
    let mut most_retired = 0;
    for cycle in 0..cycles {
        (|| -> Result<()> {
            ok(&lc(&["patch", "-p", &pid, p(&patch.path)]))?;
            t.drain();
            t.wait_for("tick hook=1002 ", WAIT)?;
            ok(&lc(&["unpatch", "-p", &pid]))?;
            // The hook is called several times per tick: one tick after the unpatch,
            // the region the pointer reaches has been called into again.
            t.drain();
            t.wait_for("tick hook=1002 ", WAIT)?;
            t.wait_for("tick hook=1002 ", WAIT)?;
            alive(&mut t)?;
            most_retired = most_retired.max(retired(t.pid())?.len());
            Ok(())
        })()
        .with_context(|| format!("cycle {cycle}"))?;
    }
    let left = retired(t.pid())?.len();
    eprintln!("{cycles} cycles: at most {most_retired} retired region(s) at a time, {left} left");
    ensure!(
        most_retired <= 3,
        "{most_retired} regions retired at once after {cycles} patches: unreferenced ones are never reclaimed"
    );
    Ok(())
}

/// A patch registers its new function as an epoll registration's data, a pointer only
/// the kernel holds: after its unpatch, and reclaims that freed other regions, its
/// region is still mapped, and the program takes the pointer back from epoll_wait and
/// calls it.
#[test]
fn a_pointer_only_an_epoll_registration_holds_keeps_its_region() -> Result<()> {
    let (_s, exe, race, epoll) = build_race()?;
    let mut t = Running::start(&exe.path, &[])?;
    t.wait_for("tick hook=1 ", WAIT)?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&epoll.path)]))?;
    let region = info(t.pid())?["objects"][0]["patches"][0]["addr"]
        .as_u64()
        .context("no applied patch")?;
    // set_hook() has run once patched: the registration is made.
    t.drain();
    t.wait_for("tick hook=1 ", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    // Enough unpatches for a reclaim (regions pile up to three first).
    let mut reclaimed = false;
    for _ in 0..3 {
        ok(&lc(&["patch", "-p", &pid, p(&race.path)]))?;
        t.drain();
        t.wait_for("tick hook=1002 ", WAIT)?;
        let before = retired(t.pid())?.len();
        ok(&lc(&["unpatch", "-p", &pid]))?;
        // One more retired, unless the reclaim unmapped some.
        reclaimed |= retired(t.pid())?.len() <= before;
        alive(&mut t)?;
    }
    let r = retired(t.pid())?;
    ensure!(
        reclaimed,
        "no region was reclaimed: the reclaim never ran ({r:x?})"
    );
    // By patch id too: a later region can be mapped where an unmapped one was.
    let kept = info(t.pid())?["retired"]
        .as_array()
        .context("no retired list")?
        .iter()
        .any(|x| x["addr"].as_u64() == Some(region) && x["patch_id"] == "epoll");
    ensure!(
        kept,
        "the region of the epoll registration ({region:#x}) was not kept: {r:x?}"
    );
    // SAFETY: kill(2) on our own child with a valid signal number.
    ensure!(unsafe { libc::kill(t.pid() as i32, libc::SIGUSR1) } == 0);
    t.wait_for("epoll hook=1002", WAIT)?;
    t.wait_for("tick hook=", WAIT)?;
    alive(&mut t)?;
    Ok(())
}
