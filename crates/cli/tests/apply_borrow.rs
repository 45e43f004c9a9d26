//! The thread livecare borrows for its remote syscalls may be in any state a thread can
//! be in (issue 16 item 1): inside `clone` (a PTRACE_EVENT_CLONE stop), in a futex
//! wait that its child's exit wakes during the borrow, in a restartable sleep, or in a
//! group stop. Fixtures: tests/fixtures/apply-borrow. Whatever the state, the target
//! survives, exit 0 means the new code runs, and exit 1 means nothing changed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// The fixture's executable `name` (from `name.c`) and its patch (`name-patched.c`:
/// `value()` returns 2 instead of 1).
fn build(s: &Scratch, name: &str) -> Result<(Object, Patch)> {
    let flags = Flags {
        extra: vec!["-pthread".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-borrow"),
        s.path(),
        flags,
    )?;
    let exe = b.executable(&format!("{name}.c"), name, &[])?;
    let patch = b.patch(&exe, &format!("{name}-patched.c"), "0001")?;
    Ok((exe, patch))
}

/// Fails unless every thread of `pid` is untraced and none is stopped (`t` or `T`).
/// Threads that exit while they are listed are skipped.
fn all_tasks_released(pid: u32) -> Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = e?.path().join("status");
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("")
            .trim()
            .to_string();
        ensure!(
            status.contains("TracerPid:\t0\n"),
            "{} still traced:\n{status}",
            path.display()
        );
        ensure!(
            !state.starts_with(['t', 'T']),
            "{} left stopped ({state})",
            path.display()
        );
    }
    Ok(())
}

/// The bytes of the executable's own code mapping(s) in `pid`.
fn code_of(pid: u32, exe: &Path) -> Result<Vec<u8>> {
    let exe = exe.canonicalize()?;
    let exe = exe.to_string_lossy();
    let snap = testkit::MemorySnapshot::take(pid)?;
    let code: Vec<u8> = snap
        .code
        .into_iter()
        .filter(|(line, _)| line.ends_with(&*exe))
        .flat_map(|(_, b)| b)
        .collect();
    ensure!(!code.is_empty(), "no code mapping of {exe} in {pid}");
    Ok(code)
}

/// `value=N` of a line, if it has one.
fn value_of(line: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("value="))
        .and_then(|v| v.parse().ok())
}

/// Waits until the target prints `value=want` three times in a row (after any number
/// of lines with the other value: printed before the change took effect).
fn settles_on(prog: &mut Running, want: u32) -> Result<()> {
    prog.settle(3, WAIT, |line| {
        Ok(match value_of(line) {
            None => testkit::Seen::Ignore,
            Some(v) if v == want => testkit::Seen::Final,
            Some(1 | 2) => testkit::Seen::Transitional,
            Some(v) => bail!("value={v}: neither version computes that"),
        })
    })
    .map(|_| ())
}

/// What one patch attempt on a fresh process gave.
#[derive(Debug, Default)]
struct Tally {
    patched: usize,
    refused: usize,
    /// Patches that returned while the target had fewer than 1001 threads (for the
    /// 1000-thread target: while it was still creating them).
    mid_creation: usize,
}

/// Patches `prog` once, `after` its start, and checks the outcome: exit 0 and the new
/// code runs (then unpatch restores the old), or exit 1 and nothing changed; the target
/// alive and released either way.
fn patch_once(
    prog: &mut Running,
    exe: &Object,
    patch: &Patch,
    tally: &mut Tally,
    ready: &str,
) -> Result<()> {
    let pid = prog.pid();
    let pid_s = pid.to_string();
    prog.wait_for(ready, WAIT)?;
    let before = code_of(pid, &exe.path)?;
    let count = || std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    let o = lc(&["patch", "-p", &pid_s, patch.path.to_str().unwrap()]);
    if count() < 1001 {
        tally.mid_creation += 1;
    }
    ensure!(
        prog.is_alive(),
        "the target died during patch ({}): {}{}; last lines {:?}",
        o.status,
        stdout(&o),
        stderr(&o),
        prog.tail(5)
    );
    all_tasks_released(pid).context("after patch")?;
    match o.status.code() {
        Some(0) => {
            tally.patched += 1;
            prog.drain();
            settles_on(prog, 2).context("after patch exited 0")?;
            ok(&lc(&["unpatch", "-p", &pid_s])).context("unpatch")?;
            prog.drain();
            settles_on(prog, 1).context("after unpatch")?;
            ensure!(
                code_of(pid, &exe.path)? == before,
                "unpatch left the code changed"
            );
        }
        Some(1) => {
            tally.refused += 1;
            ensure!(
                code_of(pid, &exe.path)? == before,
                "patch exited 1 but changed the code: {}",
                stderr(&o)
            );
            prog.drain();
            settles_on(prog, 1).context("after patch exited 1")?;
        }
        _ => bail!("patch exited {}:\n{}{}", o.status, stdout(&o), stderr(&o)),
    }
    ensure!(
        prog.is_alive(),
        "the target died; last lines {:?}",
        prog.tail(5)
    );
    all_tasks_released(pid).context("at the end")?;
    Ok(())
}

/// Waits until `pid` has `n` threads.
fn all_threads_started(pid: u32, n: usize) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let count = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
        if count >= n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{count} threads of {n} after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `JOIN_TRIALS` from the environment, else `default`.
fn trials(default: usize) -> usize {
    std::env::var("JOIN_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A main thread in a tight `pthread_create` + `pthread_join` loop: the borrowed
/// thread is usually inside `clone` or in the join's futex wait that the child's exit
/// wakes. Each trial is a fresh process patched 0.3 s after its start.
#[test]
fn patch_a_thread_create_join_loop_on_fresh_processes() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "join")?;
    let n = trials(20);
    let mut tally = Tally::default();
    let started = Instant::now();
    // A busy machine may let every thread start before the patch lands: a few more
    // trials then, so that the test does check a patch taken mid-creation.
    let mut trial = 0;
    while trial < n || (tally.mid_creation == 0 && trial < n + 7) {
        trial += 1;
        let mut prog = Running::start(&exe.path, &[])?;
        std::thread::sleep(Duration::from_millis(300));
        patch_once(&mut prog, &exe, &patch, &mut tally, "value=1")
            .with_context(|| format!("trial {trial} of {n} ({tally:?})"))?;
    }
    eprintln!(
        "join: {n} trials in {:.1} s: {tally:?}",
        started.elapsed().as_secs_f64()
    );
    // Exit 1 is allowed (nothing changed), but the loop is no reason to refuse.
    ensure!(tally.patched > 0, "no attempt took: {tally:?}");
    Ok(())
}

/// A process still creating its 1000 threads (each then sleeping) while patched, on
/// fresh processes (3, or `SPAWN_TRIALS`), then once more with all of them asleep.
#[test]
fn patch_a_process_creating_a_thousand_threads() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "spawn")?;
    let mut tally = Tally::default();
    let n = std::env::var("SPAWN_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // A busy machine may let every thread start before the patch lands: a few more
    // trials then, so that the test does check a patch taken mid-creation.
    let mut trial = 0;
    while trial < n || (tally.mid_creation == 0 && trial < n + 7) {
        trial += 1;
        let mut prog = Running::start(&exe.path, &[])?;
        patch_once(&mut prog, &exe, &patch, &mut tally, "created=100 ")
            .with_context(|| format!("trial {trial} ({tally:?})"))?;
        all_threads_started(prog.pid(), 1001)?;
        if trial == 1 {
            patch_once(&mut prog, &exe, &patch, &mut tally, "value=1")
                .with_context(|| format!("all created ({tally:?})"))?;
        }
    }
    eprintln!("spawn: {tally:?}");
    ensure!(tally.patched > 0, "no attempt took: {tally:?}");
    ensure!(
        tally.mid_creation > 0,
        "every patch came after the threads were created: {tally:?}"
    );
    Ok(())
}

/// A numeric field `key=N` of a line.
fn field(line: &str, key: &str) -> Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .with_context(|| format!("no {key} in {line:?}"))?
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}

/// The one thread of the target is in a read() that a SIGALRM without SA_RESTART
/// breaks off every 100 µs, so livecare borrows it with a signal on its way or
/// arriving meanwhile, and with a syscall to restart or to fail. Every read must
/// still fail with EINTR (never be restarted by the borrow's restore, never return
/// anything else), every signal keep its siginfo (a POSIX timer's), the handler keep
/// running, and each patch take (10 cycles, or `EINTR_CYCLES`).
#[test]
fn a_borrowed_thread_keeps_the_eintr_of_a_handler_without_sa_restart() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "eintr")?;
    let mut prog = Running::start(&exe.path, &[])?;
    prog.wait_for("value=1 ", WAIT)?;
    let pid = prog.pid().to_string();
    let check = |line: &str| -> Result<u64> {
        ensure!(
            field(line, "restarted=")? == 0,
            "a read was restarted: {line}"
        );
        ensure!(
            field(line, "other=")? == 0,
            "a read returned something else: {line}"
        );
        ensure!(
            field(line, "badinfo=")? == 0,
            "a signal came without the timer's siginfo: {line}"
        );
        field(line, "eintr=")
    };
    let mut last = 0;
    let cycles = std::env::var("EINTR_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    for cycle in 0..cycles {
        (|| -> Result<()> {
            ok(&lc(&["patch", "-p", &pid, patch.path.to_str().unwrap()]))?;
            prog.drain();
            settles_on(&mut prog, 2)?;
            ok(&lc(&["unpatch", "-p", &pid]))?;
            prog.drain();
            settles_on(&mut prog, 1)?;
            let line = prog.wait_for("value=1 ", WAIT)?;
            let eintr = check(&line)?;
            ensure!(
                eintr > last,
                "no read broken off since the last cycle: {line}"
            );
            last = eintr;
            ensure!(prog.is_alive(), "the target died");
            all_tasks_released(prog.pid())
        })()
        .with_context(|| format!("cycle {cycle}"))?;
    }
    Ok(())
}

/// A process stopped by SIGSTOP is refused with a clear message (it would have to run
/// for the remote syscalls), left stopped and unchanged; once continued it runs on and
/// can be patched.
#[test]
fn a_stopped_process_is_refused_and_stays_stopped() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, patch) = build(&s, "join")?;
    let mut prog = Running::start(&exe.path, &[])?;
    prog.wait_for("value=1", WAIT)?;
    let pid = prog.pid();
    let before = code_of(pid, &exe.path)?;
    // SAFETY: kill with a pid we started and a plain signal number.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) } == 0);
    let state = || prog.proc_state().map(|s| s.0);
    // The group stop reaches the threads one by one: wait until every thread is in it,
    // or a busy machine shows a thread still running when the test looks.
    let all_stopped = || -> Result<bool> {
        for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let status = std::fs::read_to_string(e?.path().join("status"))?;
            if !status.contains("State:\tT") {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let deadline = Instant::now() + WAIT;
    while !state()?.starts_with('T') || !all_stopped()? {
        ensure!(Instant::now() < deadline, "not stopped: {}", state()?);
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = lc(&[
        "patch",
        "-p",
        &pid.to_string(),
        patch.path.to_str().unwrap(),
    ]);
    ensure!(
        o.status.code() == Some(1) && stderr(&o).contains("is stopped"),
        "patch of a stopped process: {}\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    ensure!(state()?.starts_with('T'), "no longer stopped: {}", state()?);
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(e?.path().join("status"))?;
        ensure!(
            status.contains("TracerPid:\t0\n"),
            "still traced:\n{status}"
        );
        ensure!(
            status.contains("State:\tT"),
            "a thread not stopped:\n{status}"
        );
    }
    ensure!(code_of(pid, &exe.path)? == before, "the code changed");
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(pid as i32, libc::SIGCONT) } == 0);
    prog.drain();
    settles_on(&mut prog, 1)?;
    let mut tally = Tally::default();
    patch_once(&mut prog, &exe, &patch, &mut tally, "value=1")?;
    ensure!(tally.patched == 1, "not patched once continued: {tally:?}");
    Ok(())
}
