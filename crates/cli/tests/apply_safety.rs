//! The safety check: threads inside a function being replaced (or inside patch code
//! being removed) delay the commit; if they never leave, the operation fails cleanly
//! and the target is left byte-identical.

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{MemorySnapshot, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

fn build(s: &Scratch, patched: &str) -> Result<(Object, Patch)> {
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-safety"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "safety", &[])?;
    let patch = b.patch(&exe, patched, "0001")?;
    Ok((exe, patch))
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

#[test]
fn thread_inside_patched_function_for_a_while_is_waited_for() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "patched.c")?;
    let mut t = Running::start(&exe.path, &["hold", "1"])?;
    let line = t.wait_for("inside", WAIT)?;
    // When the thread came in (the fixture's clock reading: the test may see the line
    // late on a loaded machine); it sleeps there 1.5 s.
    let inside: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("t="))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no t= in {line:?}"))?;
    let out = ok(&lc(&["patch", "-p", &t.pid().to_string(), p(&patch.path)]))?;
    let waited = monotonic_now() - inside;
    assert!(
        waited >= 1.5 - 1e-6,
        "did not wait: patched {waited:.3} s after the thread came in to sleep 1.5 s: {out}"
    );
    t.drain();
    t.wait_for("value=2", WAIT)?;
    Ok(())
}

fn refused_cleanly(mode: &str, workers: u32, ready: &str) -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "patched.c")?;
    let mut t = Running::start(&exe.path, &[mode, &workers.to_string()])?;
    // Every worker says so from inside value(), in any order.
    let mut left: Vec<String> = (1..=workers).map(|w| format!("{ready} {w}")).collect();
    while !left.is_empty() {
        let line = t.wait_for_match(|l| left.iter().any(|w| w == l), WAIT)?;
        left.retain(|w| *w != line);
    }
    t.wait_for("value=1", WAIT)?;
    let before = MemorySnapshot::take(t.pid())?;
    let out = lc(&[
        "patch",
        "-p",
        &t.pid().to_string(),
        "--timeout",
        "0.5",
        p(&patch.path),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("unsafe to patch") && err.contains("inside value"),
        "{err}"
    );
    MemorySnapshot::take(t.pid())?.assert_same(&before)?;
    t.drain();
    t.wait_for("value=1", WAIT)?;
    assert_eq!(t.proc_state()?.1, 0, "left traced");
    Ok(())
}

#[test]
fn thread_that_never_leaves_makes_patch_fail_with_target_unchanged() -> Result<()> {
    refused_cleanly("stuck", 1, "stuck")
}

#[test]
fn thread_spinning_in_patched_function_as_top_frame_fails_cleanly() -> Result<()> {
    refused_cleanly("spin", 1, "spinning")
}

/// The main thread's stack is read before its registers, from the top of `[stack]`
/// (`safety::StopReads`): a caller frame found there must still refuse the patch, and
/// the log must show that this read was the one judged.
#[test]
fn main_thread_spinning_below_patched_function_fails_cleanly() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "patched.c")?;
    // A small environment keeps the main thread's frames within the window read early.
    let mut cmd = std::process::Command::new(&exe.path);
    cmd.args(["mainspin", "0"]).env_clear();
    let mut t = Running::spawn(cmd)?;
    t.wait_for("value=1", WAIT)?;
    t.wait_for("main spinning", WAIT)?;
    let before = MemorySnapshot::take(t.pid())?;
    let out = std::process::Command::new(livecare())
        .args(["patch", "-p", &t.pid().to_string(), "--timeout", "0.3"])
        .arg(&patch.path)
        .env("LIVECARE_LOG", "livecare_apply=debug")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("unsafe to patch") && err.contains("inside value"),
        "{err}"
    );
    assert!(
        err.contains("stack read before the registers"),
        "the main thread's stack was not taken from the early read: {err}"
    );
    MemorySnapshot::take(t.pid())?.assert_same(&before)?;
    assert!(t.is_alive());
    assert_eq!(t.proc_state()?.1, 0, "left traced");
    Ok(())
}

#[test]
fn several_stuck_threads_fail_cleanly() -> Result<()> {
    refused_cleanly("stuck", 3, "stuck")
}

#[test]
fn threads_creating_threads_while_patching() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "patched.c")?;
    let mut t = Running::start(&exe.path, &["churn", "2"])?;
    t.wait_for("value=1", WAIT)?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&patch.path)]))?;
    t.drain();
    t.wait_for("value=2", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    t.drain();
    t.wait_for("value=1", WAIT)?;
    assert!(t.is_alive());
    Ok(())
}

#[test]
fn unpatch_is_refused_while_new_code_never_returns() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "patched-never.c")?;
    let mut t = Running::start(&exe.path, &["normal", "2"])?;
    t.wait_for("value=1", WAIT)?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&patch.path)]))?;
    t.wait_for("trapped", WAIT)?;
    t.drain();
    t.wait_for("value=2", WAIT)?;
    let out = lc(&["unpatch", "-p", &pid, "--timeout", "0.5"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("unsafe to unpatch"),
        "{}",
        stderr(&out)
    );
    t.drain();
    t.wait_for("value=2", WAIT)?;
    let info = ok(&lc(&["info", "-p", &pid]))?;
    assert!(info.contains("1 hunk(s): value"), "{info}");
    Ok(())
}

#[test]
fn thread_almost_always_inside_is_caught_at_its_return() -> Result<()> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-busy"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "busy", &[])?;
    let patch = b.patch(&exe, "patched.c", "0001")?;
    let mut t = Running::start(&exe.path, &[])?;
    t.wait_for("value=1", WAIT)?;
    let out = ok(&lc(&["patch", "-p", &t.pid().to_string(), p(&patch.path)]))?;
    assert!(out.contains("patched 1 function (value)"), "{out}");
    t.drain();
    t.wait_for("value=2", WAIT)?;
    assert_eq!(t.proc_state()?.1, 0);
    Ok(())
}

/// `patch` with its `.eh_frame` zeroed, as in patches whose CFI livecare cannot use
/// (made by LibCare or LibcarePlus), the CRC-32 recomputed (see forged.rs `edited`).
fn without_eh_frame(s: &Scratch, patch: &Patch) -> Result<std::path::PathBuf> {
    let original = std::fs::read(&patch.path)?;
    let pf = kpatch_file::PatchFile::parse(&original).context("the patch parses")?;
    let mut b = original.clone();
    let elf = pf.header().kpatch_offset as usize;
    let sec = pf
        .elf_view()
        .section_by_name(".eh_frame")
        .context("the patch has an .eh_frame")?;
    let start = elf + sec.offset as usize;
    b[start..start + sec.size as usize].fill(0);
    // LibcarePlus layout (what `livecare make` writes): csum at 144.
    let total = pf.header().total_size as usize;
    let crc = kpatch_file::crc32(&b[elf..total]);
    b[144..148].copy_from_slice(&crc.to_le_bytes());
    let out = s.join("no-eh-frame.kpatch");
    std::fs::write(&out, b)?;
    Ok(out)
}

/// Issue 18.5: a patch whose code has no CFI is removed once no thread is in it, also
/// when the thread is nearly always inside it (`inside`: it is let run out of the
/// patched function, whose return address its prologue and its caller's call prove).
fn unpatch_without_eh_frame(mode: &str) -> Result<()> {
    let s = Scratch::new()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("unpatch-no-cfi"),
        s.path(),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "nocfi", &[])?;
    let patch = without_eh_frame(&s, &b.patch(&exe, "patched.c", "0001")?)?;
    let mut t = Running::start(&exe.path, &[mode])?;
    t.wait_for("value=1", WAIT)?;
    let pid = t.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, p(&patch)]))?;
    t.drain();
    t.wait_for("value=2", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid, "--timeout", "15"]))?;
    t.drain();
    t.wait_for("value=1", WAIT)?;
    assert!(t.is_alive());
    assert_eq!(t.proc_state()?.1, 0, "left traced");
    Ok(())
}

#[test]
fn patch_without_eh_frame_is_unpatched_while_the_thread_sleeps_inside_it() -> Result<()> {
    unpatch_without_eh_frame("inside")
}

#[test]
fn patch_without_eh_frame_is_unpatched_while_the_thread_runs_outside_it() -> Result<()> {
    unpatch_without_eh_frame("outside")
}
