//! Crash consistency and transactions: livecare aborted at every step of patch and
//! unpatch (`LIVECARE_FAULT`, debug builds), or SIGKILLed at random moments, never
//! kills or leaves stopped the target; the target runs each function's old or new
//! code; `info` says which, and marks an interrupted operation; `repair` brings the
//! target back to a clean state, after which patch and unpatch work as usual.
//! Multi-patch apply and unpatch are all-or-nothing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use serde_json::Value;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Running, Scratch};

/// Generous: CI machines are small and loaded; a wait only ends this early on failure.
const WAIT: Duration = Duration::from_secs(20);

/// Old and new results of the patched functions at x = 0 (see the fixture).
const ALPHA: (i64, i64) = (1, 1001);
const BETA: (i64, i64) = (0, 7);

struct Fixture {
    _s: Scratch,
    exe: Object,
    patch: Patch,
}

fn build() -> Result<Fixture> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("reliability-pair"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "pair", &[])?;
    let patch = b.patch(&exe, "patched.c", "0001")?;
    Ok(Fixture { _s: s, exe, patch })
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

/// livecare with `LIVECARE_FAULT=fault`.
fn lc_fault(fault: &str, args: &[&str]) -> Output {
    Command::new(livecare())
        .env("LIVECARE_FAULT", fault)
        .args(args)
        .output()
        .expect("spawning livecare")
}

/// The set of patched functions whose new code runs, from the target's own output;
/// also fails on any result that was neither old nor new.
fn observed(t: &mut Running) -> Result<BTreeSet<String>> {
    // Only ticks computed after this moment count: livecare has exited, so nothing
    // changes the code any more. Older ticks can still arrive (the reader thread may
    // deliver them late, even after a drain), and one of them may straddle the change
    // (computed partly before livecare stopped the thread, printed after it resumed).
    // The fixture reads the clock before calling alpha() and beta(); a tick one
    // microsecond (its printed precision) or more after `since` began after it.
    let since = monotonic_now() + 1e-6;
    t.drain();
    let mut seen = None;
    let mut compared = 0;
    while compared < 2 {
        let line = t.wait_for("tick", WAIT)?;
        let field = |k: &str| -> Result<&str> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .with_context(|| format!("no {k} in {line:?}"))
        };
        let int = |k: &str| -> Result<i64> { field(k)?.parse().with_context(|| line.clone()) };
        let (a, b, bad) = (int("a=")?, int("b=")?, int("bad=")?);
        ensure!(bad == 0, "a call returned neither old nor new: {line}");
        let mut new = BTreeSet::new();
        for (name, v, (old, newv)) in [("alpha", a, ALPHA), ("beta", b, BETA)] {
            ensure!(v == old || v == newv, "{name} = {v}: {line}");
            if v == newv {
                new.insert(name.to_string());
            }
        }
        let at: f64 = field("t=")?.parse().with_context(|| line.clone())?;
        if at < since {
            continue;
        }
        if let Some(prev) = &seen {
            ensure!(
                prev == &new,
                "code changed between ticks computed after livecare exited: {prev:?} then {new:?}"
            );
        }
        seen = Some(new);
        compared += 1;
    }
    Ok(seen.unwrap_or_default())
}

fn all_new() -> BTreeSet<String> {
    ["alpha", "beta"].iter().map(|s| s.to_string()).collect()
}

/// Every thread of `pid` runs untraced (retrying for a while: the kernel releases the
/// tracees of a dead tracer as it exits).
fn assert_free(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut bad = Vec::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let path = e?.path().join("status");
            let Ok(st) = std::fs::read_to_string(&path) else {
                continue;
            };
            let field = |k: &str| {
                st.lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                    .unwrap_or_default()
            };
            let (state, tracer) = (field("State:"), field("TracerPid:"));
            if state.starts_with(['t', 'T']) || tracer != "0" {
                bad.push(format!("{}: {state}, tracer {tracer}", path.display()));
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("threads left stopped or traced: {bad:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `info -p PID --json` for one process.
fn info(pid: u32) -> Result<Value> {
    let out = ok(&lc(&["info", "-p", &pid.to_string(), "--json"]))?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v[0].clone())
}

/// What `info` says runs new code: every hunk of applied patches plus the live
/// functions of interrupted ones; and the verdicts of the incomplete regions.
fn info_view(pid: u32) -> Result<(BTreeSet<String>, Vec<String>)> {
    let i = info(pid)?;
    let mut live = BTreeSet::new();
    for o in i["objects"].as_array().context("objects")? {
        for patch in o["patches"].as_array().context("patches")? {
            ensure!(patch["state"] == "applied", "{patch}");
            for h in patch["hunks"].as_array().context("hunks")? {
                live.insert(h["name"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    let mut verdicts = Vec::new();
    for c in i["incomplete"].as_array().context("incomplete")? {
        for f in c["functions_live"].as_array().context("functions_live")? {
            live.insert(f.as_str().unwrap_or_default().to_string());
        }
        verdicts.push(match &c["verdict"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    }
    Ok((live, verdicts))
}

/// `info` agrees with the target's behaviour; returns the incomplete verdicts.
fn assert_info_truthful(t: &mut Running) -> Result<(BTreeSet<String>, Vec<String>)> {
    let seen = observed(t)?;
    let (live, verdicts) = info_view(t.pid())?;
    ensure!(
        live == seen,
        "info says new code runs in {live:?}, the target shows {seen:?} (verdicts {verdicts:?})\n{}\n{}",
        info(t.pid())?,
        std::fs::read_to_string(format!("/proc/{}/maps", t.pid()))?
    );
    Ok((seen, verdicts))
}

fn aborted(out: &Output) -> Result<()> {
    ensure!(
        out.status.signal() == Some(libc::SIGABRT),
        "livecare was not aborted by the fault ({}):\n{}\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    Ok(())
}

/// `repair -p PID`; afterwards nothing is incomplete and the code is all old or all new.
fn repair(t: &mut Running) -> Result<String> {
    let out = ok(&lc(&["repair", "-p", &t.pid().to_string()]))?;
    assert_free(t.pid())?;
    let (seen, verdicts) = assert_info_truthful(t)?;
    ensure!(
        verdicts.is_empty(),
        "still incomplete after repair: {verdicts:?}\n{out}"
    );
    ensure!(
        seen.is_empty() || seen == all_new(),
        "mixed after repair: {seen:?}"
    );
    Ok(out)
}

/// The lines of `/proc/PID/maps`: (start, end, the line).
fn maps(pid: u32) -> Result<Vec<(u64, u64, String)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for l in text.lines() {
        let (range, _) = l.split_once(' ').context("maps line")?;
        let (a, b) = range.split_once('-').context("maps range")?;
        out.push((
            u64::from_str_radix(a, 16)?,
            u64::from_str_radix(b, 16)?,
            l.to_string(),
        ));
    }
    Ok(out)
}

/// An address range: start, end.
type Range = (u64, u64);

/// The address ranges `info` accounts for: every region (applied, incomplete or
/// retired) and every leftover mapping; and the retired regions alone.
fn reported(pid: u32) -> Result<(Vec<Range>, Vec<Range>)> {
    let i = info(pid)?;
    let range = |r: &Value| {
        let a = r["addr"].as_u64().unwrap_or(0);
        (a, a + r["total_len"].as_u64().unwrap_or(0))
    };
    let mut all = Vec::new();
    for o in i["objects"].as_array().context("objects")? {
        all.extend(
            o["patches"]
                .as_array()
                .context("patches")?
                .iter()
                .map(range),
        );
    }
    for c in i["incomplete"].as_array().context("incomplete")? {
        all.push(range(&c["region"]));
    }
    let retired: Vec<Range> = i["retired"]
        .as_array()
        .context("retired")?
        .iter()
        .map(range)
        .collect();
    all.extend(&retired);
    for l in i["leftovers"].as_array().context("leftovers")? {
        if l["kind"] == "mapping" {
            let a = l["addr"].as_u64().unwrap_or(0);
            all.push((a, a + l["len"].as_u64().unwrap_or(0)));
        }
    }
    Ok((all, retired))
}

/// Every mapping of the target not in `baseline` is one `info` reports; with
/// `clean`, those are retired regions only (what `repair` leaves).
fn assert_maps_accounted(pid: u32, baseline: &[(u64, u64, String)], clean: bool) -> Result<()> {
    let (all, retired) = reported(pid)?;
    let allowed = if clean { &retired } else { &all };
    let now = maps(pid)?;
    let covered = |s: u64, e: u64| allowed.iter().any(|&(a, b)| a <= s && e <= b);
    let extra: Vec<&String> = now
        .iter()
        .filter(|m| !baseline.iter().any(|b| b.2 == m.2) && !covered(m.0, m.1))
        .map(|m| &m.2)
        .collect();
    let gone: Vec<&String> = baseline
        .iter()
        .filter(|b| !now.iter().any(|m| m.2 == b.2))
        .map(|b| &b.2)
        .collect();
    ensure!(
        extra.is_empty() && gone.is_empty(),
        "mappings not accounted for ({}): new {extra:#?}, gone {gone:#?}\ninfo: {}",
        if clean {
            "after repair"
        } else {
            "reported by info"
        },
        info(pid)?
    );
    Ok(())
}

/// Leftovers `info` lists (mappings with no header, marks, stubs).
fn leftover_kinds(pid: u32) -> Result<Vec<String>> {
    let i = info(pid)?;
    Ok(i["leftovers"]
        .as_array()
        .context("leftovers")?
        .iter()
        .map(|l| l["kind"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// Regions of any state in the target (applied or not).
fn region_count(pid: u32) -> Result<usize> {
    let i = info(pid)?;
    let applied: usize = i["objects"]
        .as_array()
        .context("objects")?
        .iter()
        .map(|o| o["patches"].as_array().map_or(0, |a| a.len()))
        .sum();
    Ok(applied + i["incomplete"].as_array().map_or(0, |a| a.len()))
}

fn patch_ok(t: &mut Running, f: &Fixture) -> Result<()> {
    ok(&lc(&[
        "patch",
        "-p",
        &t.pid().to_string(),
        p(&f.patch.path),
    ]))?;
    ensure!(observed(t)? == all_new(), "patch did not take");
    Ok(())
}

fn unpatch_ok(t: &mut Running) -> Result<()> {
    ok(&lc(&["unpatch", "-p", &t.pid().to_string()]))?;
    ensure!(observed(t)?.is_empty(), "unpatch did not take");
    Ok(())
}

fn every_fault_step(threads: &str) -> Result<()> {
    let f = build()?;
    let mut t = Running::start(&f.exe.path, &[threads])?;
    t.wait_for("tick", WAIT)?;
    let pid = t.pid().to_string();
    let ctx = |step: &str| format!("{threads} worker thread(s), fault {step}");
    let baseline = maps(t.pid())?;

    for step in [
        "in-mmap-stub",
        "after-mmap",
        "after-body",
        "half-jumps",
        "before-detach",
    ] {
        (|| -> Result<()> {
            aborted(&lc_fault(step, &["patch", "-p", &pid, p(&f.patch.path)]))?;
            ensure!(t.is_alive(), "target died");
            assert_free(t.pid())?;
            let (seen, verdicts) = assert_info_truthful(&mut t)?;
            assert_maps_accounted(t.pid(), &baseline, false)?;
            match step {
                "in-mmap-stub" => {
                    // Killed between the mmap and the header: the mapping is named by
                    // its mark, and the thread's stub is still in the padding.
                    ensure!(seen.is_empty(), "{seen:?}");
                    ensure!(verdicts.is_empty(), "{verdicts:?}");
                    let mut kinds = leftover_kinds(t.pid())?;
                    kinds.sort();
                    ensure!(kinds == ["mapping", "stub"], "{kinds:?}");
                    let human = ok(&lc(&["info", "-p", &pid]))?;
                    ensure!(human.contains("LEFTOVER"), "{human}");
                }
                "after-mmap" | "after-body" => {
                    ensure!(seen.is_empty(), "{seen:?}");
                    ensure!(verdicts == ["unmap"], "{verdicts:?}");
                }
                "half-jumps" => {
                    ensure!(seen.len() == 1, "not half applied: {seen:?}");
                    ensure!(verdicts == ["roll-back"], "{verdicts:?}");
                    let human = ok(&lc(&["info", "-p", &pid]))?;
                    ensure!(human.contains("INCOMPLETE"), "{human}");
                    // Nothing is built on top of a half-done commit.
                    let again = lc(&["patch", "-p", &pid, p(&f.patch.path)]);
                    ensure!(
                        again.status.code() == Some(1)
                            && stderr(&again).contains("livecare repair -p"),
                        "{}",
                        stderr(&again)
                    );
                }
                _ => {
                    ensure!(seen == all_new(), "{seen:?}");
                    ensure!(verdicts.is_empty(), "{verdicts:?}");
                }
            }
            let out = repair(&mut t)?;
            if step == "before-detach" {
                ensure!(out.contains("nothing to repair"), "{out}");
                unpatch_ok(&mut t)?;
            } else {
                ensure!(observed(&mut t)?.is_empty(), "not rolled back");
            }
            ensure!(region_count(t.pid())? == 0, "a region is left");
            ensure!(
                leftover_kinds(t.pid())?.is_empty(),
                "leftovers after repair"
            );
            assert_maps_accounted(t.pid(), &baseline, true)?;
            Ok(())
        })()
        .with_context(|| ctx(step))?;
    }

    for step in [
        "before-stop",
        "half-restores",
        "before-munmap",
        "before-detach",
    ] {
        (|| -> Result<()> {
            patch_ok(&mut t, &f)?;
            aborted(&lc_fault(step, &["unpatch", "-p", &pid]))?;
            ensure!(t.is_alive(), "target died");
            assert_free(t.pid())?;
            let (seen, verdicts) = assert_info_truthful(&mut t)?;
            match step {
                "half-restores" => {
                    ensure!(seen.len() == 1, "not half removed: {seen:?}");
                    ensure!(verdicts == ["finish-removal"], "{verdicts:?}");
                }
                "before-munmap" => {
                    // Removed and retired: a clean state, reclaimed by the next
                    // unpatch or repair once nothing points into it.
                    ensure!(seen.is_empty(), "{seen:?}");
                    ensure!(verdicts.is_empty(), "{verdicts:?}");
                    ensure!(reported(t.pid())?.1.len() == 1, "not retired");
                }
                "before-stop" => {
                    ensure!(seen == all_new(), "{seen:?}");
                    ensure!(verdicts.is_empty(), "{verdicts:?}");
                    unpatch_ok(&mut t)?;
                }
                _ => {
                    ensure!(seen.is_empty(), "{seen:?}");
                    ensure!(verdicts.is_empty(), "{verdicts:?}");
                }
            }
            repair(&mut t)?;
            ensure!(observed(&mut t)?.is_empty(), "unpatch not finished");
            ensure!(region_count(t.pid())? == 0, "a region is left");
            ensure!(
                leftover_kinds(t.pid())?.is_empty(),
                "leftovers after repair"
            );
            assert_maps_accounted(t.pid(), &baseline, true)?;
            Ok(())
        })()
        .with_context(|| ctx(step))?;
    }

    // Business as usual afterwards.
    patch_ok(&mut t, &f)?;
    unpatch_ok(&mut t)?;
    ensure!(t.is_alive());
    Ok(())
}

#[test]
fn fault_at_every_step_single_thread_target_stays_consistent_and_repairable() -> Result<()> {
    every_fault_step("0")
}

#[test]
fn fault_at_every_step_eight_thread_target_stays_consistent_and_repairable() -> Result<()> {
    every_fault_step("7")
}

/// A small xorshift generator: random delays without a dependency, reproducible
/// from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn sigkill_at_random_moments_during_patch_and_unpatch_never_hurts_the_target() -> Result<()> {
    let trials: usize = std::env::var("LIVECARE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = std::env::var("LIVECARE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let mut rng = Rng(seed);
    let f = build()?;
    let mut t = Running::start(&f.exe.path, &["7"])?;
    t.wait_for("tick", WAIT)?;
    let pid = t.pid().to_string();
    let baseline = maps(t.pid())?;

    // How long an uninterrupted patch and unpatch take: kills land within that.
    let t0 = Instant::now();
    patch_ok(&mut t, &f)?;
    let span_patch = t0.elapsed();
    let t0 = Instant::now();
    unpatch_ok(&mut t)?;
    let span_unpatch = t0.elapsed();

    let mut stats = std::collections::BTreeMap::<String, usize>::new();
    let mut applied = false;
    for trial in 0..trials {
        let (args, span) = if applied {
            (vec!["unpatch", "-p", &pid], span_unpatch)
        } else {
            (vec!["patch", "-p", &pid, p(&f.patch.path)], span_patch)
        };
        // Half the kills anywhere in the run, half in its last part, where the stop,
        // the waits for busy threads and the journal writes happen.
        let us = span.as_micros() as u64 + 1;
        let delay = Duration::from_micros(if trial % 2 == 0 {
            rng.next() % (us * 6 / 5)
        } else {
            us / 2 + rng.next() % (us * 7 / 10)
        });
        let res = (|| -> Result<String> {
            let mut child = Command::new(livecare())
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            std::thread::sleep(delay);
            let _ = child.kill(); // SIGKILL
            let status = child.wait()?;
            let killed = status.signal() == Some(libc::SIGKILL);
            ensure!(t.is_alive(), "target died");
            assert_free(t.pid())?;
            let (seen, verdicts) = assert_info_truthful(&mut t)?;
            // Nothing is left that `info` does not name.
            assert_maps_accounted(t.pid(), &baseline, false)?;
            let left = leftover_kinds(t.pid())?;
            let outcome = format!(
                "{} {}: {}{}{}",
                args[0],
                if killed { "killed" } else { "finished" },
                match seen.len() {
                    0 => "old",
                    2 => "new",
                    _ => "mixed",
                },
                if verdicts.is_empty() {
                    String::new()
                } else {
                    format!(", incomplete {verdicts:?}")
                },
                if left.is_empty() {
                    String::new()
                } else {
                    format!(", leftovers {left:?}")
                }
            );
            if !verdicts.is_empty() || !left.is_empty() {
                repair(&mut t)?;
                ensure!(
                    leftover_kinds(t.pid())?.is_empty(),
                    "leftovers after repair"
                );
                // Back to the baseline, retired regions (reported) aside.
                if observed(&mut t)?.is_empty() {
                    assert_maps_accounted(t.pid(), &baseline, true)?;
                }
            }
            applied = !observed(&mut t)?.is_empty();
            Ok(outcome)
        })()
        .with_context(|| format!("trial {trial} ({} after {delay:?}), seed {seed}", args[0]))?;
        *stats.entry(res).or_default() += 1;
    }
    eprintln!(
        "{trials} trials (seed {seed}, patch {span_patch:?}, unpatch {span_unpatch:?}): {stats:#?}"
    );
    if applied {
        unpatch_ok(&mut t)?;
    }
    patch_ok(&mut t, &f)?;
    unpatch_ok(&mut t)?;
    Ok(())
}

/// The executable and its library, a patch for each, and a directory holding both
/// in the order they are applied (executable first).
struct Multi {
    s: Scratch,
    exe: Object,
    lib: Object,
    dir: std::path::PathBuf,
}

fn build_multi() -> Result<Multi> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("reliability-multi"),
        s.path(),
        Flags::default(),
    )?;
    let lib = b.library("lib.c", "multi")?;
    let exe = b.executable("orig.c", "multi", &[&lib])?;
    let pe = b.patch(&exe, "patched.c", "0001")?;
    let pl = b.patch(&lib, "lib-patched.c", "0002")?;
    let dir = s.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&pe.path, dir.join("1-exe.kpatch"))?;
    std::fs::copy(&pl.path, dir.join("2-lib.kpatch"))?;
    Ok(Multi { s, exe, lib, dir })
}

#[test]
fn later_patch_failing_rolls_back_the_earlier_one_in_the_same_process() -> Result<()> {
    let m = build_multi()?;
    // A thread parked inside lib_value for good: the library patch can never commit,
    // after the executable's patch has been applied.
    let mut t = Running::start(&m.exe.path, &["stuck"])?;
    // Printed from inside lib_value ("parking" comes before the call).
    t.wait_for("parked", WAIT)?;
    t.wait_for("tick exe=1 lib=1", WAIT)?;
    let before = testkit::MemorySnapshot::take(t.pid())?;
    let pid = t.pid().to_string();
    let out = lc(&["patch", "-p", &pid, "--timeout", "0.5", p(&m.dir)]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("inside lib_value"), "{err}");
    assert_free(t.pid())?;
    // Nothing of either patch is left: same code, same mappings, same output.
    testkit::MemorySnapshot::take(t.pid())?.assert_same(&before)?;
    t.drain();
    t.wait_for("tick exe=1 lib=1", WAIT)?;
    assert_eq!(region_count(t.pid())?, 0);
    // The executable's patch alone was fine: it applies now.
    let exe_patch = m.dir.join("1-exe.kpatch");
    ok(&lc(&["patch", "-p", &pid, p(&exe_patch)]))?;
    t.drain();
    t.wait_for("tick exe=2 lib=1", WAIT)?;
    Ok(())
}

#[test]
fn unpatch_of_several_patches_is_all_or_nothing() -> Result<()> {
    let m = build_multi()?;
    let mut t = Running::start(&m.exe.path, &[])?;
    t.wait_for("tick exe=1 lib=1", WAIT)?;
    let pid = t.pid().to_string();
    let out = ok(&lc(&["patch", "-p", &pid, p(&m.dir)]))?;
    t.drain();
    t.wait_for("tick exe=2 lib=2", WAIT)?;
    // Park a thread inside the library's new code: that patch cannot come off.
    // SAFETY: kill(2) on our own child with a valid signal number.
    assert_eq!(unsafe { libc::kill(t.pid() as i32, libc::SIGUSR1) }, 0);
    t.wait_for("parked", WAIT)?;
    let before = testkit::MemorySnapshot::take(t.pid())?;
    let both = [
        "unpatch",
        "-p",
        &pid,
        "--timeout",
        "0.5",
        &m.exe.build_id,
        &m.lib.build_id,
    ];
    let res = lc(&both);
    assert_eq!(res.status.code(), Some(1), "{out}\n{}", stdout(&res));
    assert!(
        stderr(&res).contains("unsafe to unpatch"),
        "{}",
        stderr(&res)
    );
    assert_free(t.pid())?;
    // The executable's patch, which could have come off alone, is still there.
    testkit::MemorySnapshot::take(t.pid())?.assert_same(&before)?;
    t.drain();
    t.wait_for("tick exe=2 lib=2", WAIT)?;
    let (live, verdicts) = info_view(t.pid())?;
    assert!(verdicts.is_empty(), "{verdicts:?}");
    assert_eq!(
        live,
        ["exe_value", "lib_value"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    // Each alone: the executable's comes off.
    ok(&lc(&["unpatch", "-p", &pid, &m.exe.build_id]))?;
    t.drain();
    t.wait_for("tick exe=1 lib=2", WAIT)?;
    drop(m.s);
    Ok(())
}
