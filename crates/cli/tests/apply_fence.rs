//! Idle workers blocked in a syscall (tests/fixtures/apply-fence: 16 threads in read()
//! on a FIFO) are fenced, not stopped, by the commit: livecare leaves them inside their
//! syscall with its exit stop armed, the report counts them (`threads_fenced`), and when
//! livecare exits they are released untraced and still blocked. Woken afterwards, or
//! woken while livecare prepares and commits, each must run the version in effect and
//! nothing may crash or stay stopped.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::*;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);
/// Worker threads of the fixture (WORKERS in orig.c).
const WORKERS: usize = 16;

/// The fixture built, its patch, and the FIFO its workers read.
struct Setup {
    _scratch: Scratch,
    exe: Object,
    patch: Patch,
    fifo: std::path::PathBuf,
}

fn setup() -> Result<Setup> {
    let s = Scratch::new()?;
    let flags = Flags {
        extra: vec!["-pthread".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-fence"),
        s.path(),
        flags,
    )?;
    let exe = b.executable("orig.c", "fence", &[])?;
    let patch = b.patch(&exe, "patched.c", "0001")?;
    let fifo = s.join("wake");
    mkfifo(&fifo)?;
    Ok(Setup {
        _scratch: s,
        exe,
        patch,
        fifo,
    })
}

/// Creates a FIFO at `path`.
fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    ensure!(
        rc == 0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Starts the fixture on `fifo` and waits until its main thread prints (the workers are
/// blocked in read() by then: they do nothing else after starting).
fn start(s: &Setup) -> Result<(Running, std::fs::File)> {
    let mut prog = Running::start(&s.exe.path, &[s.fifo.to_str().context("fifo path")?])?;
    prog.wait_for("main answer=1", WAIT)?;
    prog.wait_for("main answer=1", WAIT)?;
    // The target holds the FIFO open for reading, so this open does not block.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.fifo)
        .context("opening the FIFO for writing")?;
    Ok((prog, w))
}

/// `threads_fenced` of the first report under `key` ("patched" or "unpatched").
fn threads_fenced(json: &str, key: &str) -> Result<u64> {
    let doc: serde_json::Value = serde_json::from_str(json).context("parsing livecare's JSON")?;
    doc.get(key)
        .and_then(|v| v.get(0))
        .and_then(|r| r.get("threads_fenced"))
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no {key}[0].threads_fenced in {doc}"))
}

/// Fails unless every thread of `pid` is untraced and none is in a tracing stop.
fn all_tasks_released(pid: u32) -> Result<()> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = e?.path().join("status");
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("")
            .trim();
        ensure!(
            status.contains("TracerPid:\t0\n"),
            "{} still traced:\n{status}",
            path.display()
        );
        ensure!(
            !state.starts_with('t') && !state.starts_with('T'),
            "{} left stopped ({state})",
            path.display()
        );
        n += 1;
    }
    ensure!(
        n == WORKERS + 1,
        "expected {} threads, found {n}",
        WORKERS + 1
    );
    Ok(())
}

/// Threads of `pid` blocked in read() (per /proc/PID/task/TID/syscall).
fn threads_in_read(pid: u32) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(e?.path().join("syscall"))?;
        if text.split_whitespace().next() == Some(&libc::SYS_read.to_string()) {
            n += 1;
        }
    }
    Ok(n)
}

/// Each task's `/proc/PID/task/TID/syscall` first field, for failure messages.
fn syscalls_of(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(tasks unreadable)".into();
    };
    dir.flatten()
        .map(|e| {
            let text = std::fs::read_to_string(e.path().join("syscall")).unwrap_or_default();
            let first = text.split_whitespace().next().unwrap_or("?").to_string();
            format!("{}:{first}", e.file_name().to_string_lossy())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses a `worker=<i> answer=<a>` line.
fn worker_answer(line: &str) -> Result<(usize, u32)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .with_context(|| format!("no {k} in {line:?}"))
    };
    Ok((field("worker=")?.parse()?, field("answer=")?.parse()?))
}

/// Wakes the workers with bytes on the FIFO until every one of them has answered, and
/// fails on any answer other than `want`. Each byte is read by one worker and gives
/// exactly one line; a worker naps after answering, so the bytes spread over the others.
fn every_worker_answers(prog: &mut Running, fifo: &mut std::fs::File, want: u32) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let mut seen = BTreeSet::new();
    while seen.len() < WORKERS {
        ensure!(
            Instant::now() < deadline,
            "only workers {seen:?} answered within {WAIT:?}"
        );
        let missing = WORKERS - seen.len();
        fifo.write_all(&vec![b'x'; missing])?;
        for _ in 0..missing {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = prog.wait_for_match(|l| l.starts_with("worker="), left)?;
            let (i, a) = worker_answer(&line)?;
            ensure!(a == want, "{line:?}: expected answer={want}");
            ensure!(i < WORKERS, "{line:?}: no such worker");
            seen.insert(i);
        }
    }
    Ok(())
}

/// Commits tried before giving up on one that fences every worker.
const FENCE_TRIES: usize = 5;

/// Runs livecare `op` (its JSON report under `key`) until its commit fences every
/// blocked worker, running `undo` between tries; every try must leave all threads
/// untraced and running, and fence no more than the workers and main. Tries: livecare
/// stops a fence candidate like any other thread when it does not reach its stop within
/// its bound (20 ms), which happens when the machine is short of CPUs.
fn until_all_fenced(pid: u32, op: &[&str], key: &str, undo: &[&str]) -> Result<()> {
    let mut seen = Vec::new();
    for _ in 0..FENCE_TRIES {
        let out = ok(&lc(op))?;
        all_tasks_released(pid)?;
        let fenced = threads_fenced(&out, key)?;
        ensure!(
            fenced <= WORKERS as u64 + 1,
            "threads_fenced = {fenced}, more than the {} threads: {out}",
            WORKERS + 1
        );
        // All 16 workers have slept in read() since before livecare started; main
        // wakes every 2 ms and is normally stopped, but a commit could catch it asleep.
        if fenced >= WORKERS as u64 {
            // Released where they were fenced: inside the read() nothing ended. A
            // worker the commit stopped instead (when main, asleep, was fenced in its
            // place) restarts its read() only once it gets a CPU, and /proc shows a task
            // that is being woken as running: allow a short settle, and say so.
            let start = Instant::now();
            let mut blocked = threads_in_read(pid)?;
            while blocked != WORKERS && start.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(5));
                blocked = threads_in_read(pid)?;
            }
            if start.elapsed() >= Duration::from_millis(5) {
                eprintln!(
                    "{op:?}: {blocked} of {WORKERS} workers in read() after {:?}",
                    start.elapsed()
                );
            }
            ensure!(
                blocked == WORKERS,
                "{blocked} threads in read() after livecare, expected {WORKERS} \
                 ({fenced} fenced): {}",
                syscalls_of(pid)
            );
            return Ok(());
        }
        eprintln!("{op:?}: {fenced} of {WORKERS} workers fenced, trying again");
        seen.push(fenced);
        ok(&lc(undo))?;
        all_tasks_released(pid)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("`livecare {op:?}` never fenced the {WORKERS} blocked workers: {seen:?}")
}

#[test]
fn blocked_workers_are_fenced_not_stopped_and_see_the_patch_when_woken() -> Result<()> {
    let s = setup()?;
    let (mut prog, mut fifo) = start(&s)?;
    let pid = prog.pid().to_string();
    let patch = [
        "patch",
        "-p",
        &pid,
        "--json",
        s.patch.path.to_str().unwrap(),
    ];
    let unpatch = ["unpatch", "-p", &pid, "--json"];

    until_all_fenced(prog.pid(), &patch, "patched", &unpatch)?;
    prog.wait_for("main answer=2", WAIT)?;
    every_worker_answers(&mut prog, &mut fifo, 2)?;

    // Back to sleep for long enough to count as idle for the unpatch.
    std::thread::sleep(Duration::from_millis(50));
    until_all_fenced(prog.pid(), &unpatch, "unpatched", &patch)?;
    prog.wait_for("main answer=1", WAIT)?;
    every_worker_answers(&mut prog, &mut fifo, 1)?;
    ensure!(prog.is_alive(), "the target died");
    Ok(())
}

/// Gaps between the writer's bytes, one per 30 ms phase, in turn. At 200 µs every worker
/// wakes every few ms, too often to be fenced at all; at the longer gaps, workers that
/// slept through livecare's preparation are fenced, and the next byte can wake one of
/// them in the middle of the commit or before livecare lets it go.
const WRITE_GAPS_US: [u64; 3] = [200, 2_000, 5_000];

/// Writes one byte to the FIFO at a time, WRITE_GAPS_US apart, until `stop`; counts
/// them in `written`.
fn writer(
    fifo: std::fs::File,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || -> Result<()> {
        let mut fifo = fifo;
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            fifo.write_all(b"w").context("writing to the FIFO")?;
            written.fetch_add(1, Ordering::Relaxed);
            let phase = (start.elapsed().as_millis() / 30) as usize % WRITE_GAPS_US.len();
            std::thread::sleep(Duration::from_micros(WRITE_GAPS_US[phase]));
        }
        Ok(())
    })
}

/// Bytes waiting in the FIFO (FIONREAD on our end of it).
fn unread(fifo: &std::fs::File) -> Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer; the descriptor is open.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(fifo),
            libc::FIONREAD,
            &mut n,
        )
    };
    ensure!(rc == 0, "FIONREAD: {}", std::io::Error::last_os_error());
    Ok(n)
}

#[test]
fn workers_woken_during_patch_cycles_never_crash_and_settle_on_the_right_version() -> Result<()> {
    let s = setup()?;
    let (mut prog, mut fifo) = start(&s)?;
    let pid = prog.pid().to_string();
    let worker_lines = |prog: &Running| {
        prog.tail(usize::MAX)
            .iter()
            .filter(|l| l.starts_with("worker="))
            .cloned()
            .collect::<Vec<_>>()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let w = writer(fifo.try_clone()?, stop.clone(), written.clone());
    let mut fenced_total = 0;
    let mut lines_before = 0;
    let result = (|| -> Result<()> {
        for cycle in 0..20 {
            (|| -> Result<()> {
                let out = ok(&lc(&[
                    "patch",
                    "-p",
                    &pid,
                    "--json",
                    s.patch.path.to_str().unwrap(),
                ]))?;
                fenced_total += threads_fenced(&out, "patched")?;
                let out = ok(&lc(&["unpatch", "-p", &pid, "--json"]))?;
                fenced_total += threads_fenced(&out, "unpatched")?;
                ensure!(prog.is_alive(), "the target died");
                // The workers went on answering through the cycle.
                let now = worker_lines(&prog).len();
                ensure!(now > lines_before, "no worker answered during the cycle");
                lines_before = now;
                Ok(())
            })()
            .with_context(|| format!("cycle {cycle}"))?;
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    w.join().expect("writer thread panicked")?;
    result?;
    eprintln!(
        "{} bytes written during the cycles, {fenced_total} threads fenced over 40 commits",
        written.load(Ordering::Relaxed)
    );
    // The sparser phases leave workers idle long enough to be fenced and then woken.
    ensure!(fenced_total > 0, "no commit fenced a worker");

    // Let the workers take what is left in the FIFO, then forget those lines.
    let deadline = Instant::now() + WAIT;
    while unread(&fifo)? > 0 {
        ensure!(
            Instant::now() < deadline,
            "the workers stopped reading the FIFO"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    let during = worker_lines(&prog);
    prog.drain();

    // The workers answered all along, under both versions, and nothing else.
    let mut versions = BTreeSet::new();
    for l in &during {
        versions.insert(worker_answer(l)?.1);
    }
    ensure!(
        during.len() >= 100,
        "only {} worker lines during 20 cycles",
        during.len()
    );
    if versions != BTreeSet::from([1, 2]) {
        bail!("answers during the cycles: {versions:?}, expected both 1 and 2");
    }

    all_tasks_released(prog.pid())?;
    prog.wait_for("main answer=1", WAIT)?;
    every_worker_answers(&mut prog, &mut fifo, 1)?;
    ensure!(prog.is_alive(), "the target died");
    Ok(())
}

#[test]
fn a_patch_of_the_function_blocked_workers_sleep_in_is_refused_and_leaves_them_working(
) -> Result<()> {
    let s = setup()?;
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("apply-fence"),
        s._scratch.path(),
        Flags {
            extra: vec!["-pthread".into()],
            ..Flags::default()
        },
    )?;
    let of_worker = b.patch(&s.exe, "patched-worker.c", "0002")?;
    let (mut prog, mut fifo) = start(&s)?;
    let pid = prog.pid().to_string();
    let refused = |out: &std::process::Output| -> Result<()> {
        ensure!(!out.status.success(), "the patch of worker() was applied");
        let err = stderr(out);
        ensure!(err.contains("unsafe") && err.contains("worker"), "{err}");
        all_tasks_released(prog.pid())
    };
    let of_worker_path = of_worker.path.to_str().unwrap();
    // Every worker sleeps in worker(), all of them fenced: only their judgement before
    // the stop can find them there.
    refused(&lc(&[
        "patch",
        "-p",
        &pid,
        "--timeout",
        "0.3",
        of_worker_path,
    ]))?;
    // Again while bytes keep waking some of them (each goes back to sleep in worker()):
    // the retries also let go of fenced threads that woke between attempts.
    let stop = Arc::new(AtomicBool::new(false));
    let waker = {
        let stop = stop.clone();
        let mut w = fifo.try_clone()?;
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                w.write_all(b"x")?;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };
    let out = lc(&["patch", "-p", &pid, "--timeout", "0.5", of_worker_path]);
    stop.store(true, Ordering::Relaxed);
    waker.join().expect("waker thread")?;
    refused(&out)?;
    let info = stdout(&lc(&["info", "-p", &pid]));
    ensure!(
        info.lines()
            .filter(|l| l.contains(&s.exe.build_id))
            .all(|l| l.contains("not patched")),
        "{info}"
    );
    // Nothing changed: every worker still runs the original worker() and answer().
    prog.drain();
    every_worker_answers(&mut prog, &mut fifo, 1)?;
    ensure!(
        !prog.tail(WORKERS * 2).iter().any(|l| l.ends_with(" v2")),
        "a worker ran the refused worker(): {:?}",
        prog.tail(WORKERS * 2)
    );
    // And the patch the workers are not inside still goes in, fenced (once the last
    // workers to answer are back in read() from their nap).
    std::thread::sleep(Duration::from_millis(50));
    until_all_fenced(
        prog.pid(),
        &[
            "patch",
            "-p",
            &pid,
            "--json",
            s.patch.path.to_str().unwrap(),
        ],
        "patched",
        &["unpatch", "-p", &pid],
    )?;
    every_worker_answers(&mut prog, &mut fifo, 2)?;
    ensure!(prog.is_alive(), "the target died");
    Ok(())
}

/// True if `info` shows a patch applied to the fixture (after `repair`, nothing else).
fn applied(pid: &str) -> Result<bool> {
    let out = ok(&lc(&["info", "-p", pid, "--json"]))?;
    let doc: serde_json::Value = serde_json::from_str(&out).context("parsing info")?;
    let states: Vec<&str> = doc
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["objects"].as_array().into_iter().flatten())
        .flat_map(|o| o["patches"].as_array().into_iter().flatten())
        .filter_map(|p| p["state"].as_str())
        .collect();
    ensure!(
        states.iter().all(|s| *s == "applied"),
        "after repair: {states:?}"
    );
    Ok(!states.is_empty())
}

#[test]
fn sigkill_of_livecare_while_workers_are_fenced_leaves_them_untraced_in_their_syscall() -> Result<()>
{
    use std::os::unix::process::ExitStatusExt as _;
    let s = setup()?;
    let (mut prog, mut fifo) = start(&s)?;
    let pid = prog.pid().to_string();
    let patch = ["patch", "-p", &pid, s.patch.path.to_str().unwrap()];
    let unpatch = ["unpatch", "-p", &pid];
    // How long an uninterrupted run takes: kills land within that, half of them in its
    // second half, where the fencing, the stop and the release happen.
    let t0 = Instant::now();
    ok(&lc(&patch))?;
    let span = t0.elapsed();
    ok(&lc(&unpatch))?;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(prog.pid());
    let mut killed = 0;
    for trial in 0..16 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let us = span.as_micros() as u64 + 1;
        let delay = if trial % 2 == 0 {
            rng % (us * 6 / 5)
        } else {
            us / 2 + rng % (us * 7 / 10)
        };
        std::thread::sleep(Duration::from_millis(30)); // idle again: fence candidates
        let args: &[&str] = if applied(&pid)? { &unpatch } else { &patch };
        (|| -> Result<()> {
            let mut child = std::process::Command::new(livecare())
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            std::thread::sleep(Duration::from_micros(delay));
            let _ = child.kill();
            killed += usize::from(child.wait()?.signal() == Some(libc::SIGKILL));
            // The kernel released every thread with its tracer; a worker caught between
            // its fence stops goes back into its read() by itself.
            all_tasks_released(prog.pid())?;
            let deadline = Instant::now() + WAIT;
            while threads_in_read(prog.pid())? != WORKERS {
                ensure!(
                    Instant::now() < deadline,
                    "workers did not go back to read()"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            ok(&lc(&["repair", "-p", &pid]))?;
            let want = if applied(&pid)? { 2 } else { 1 };
            prog.drain();
            prog.wait_for(&format!("main answer={want}"), WAIT)?;
            every_worker_answers(&mut prog, &mut fifo, want)?;
            ensure!(prog.is_alive(), "the target died");
            Ok(())
        })()
        .with_context(|| format!("trial {trial}: {args:?} killed after {delay} µs"))?;
    }
    eprintln!("16 trials, {killed} livecare runs killed before they finished (span {span:?})");
    if applied(&pid)? {
        ok(&lc(&unpatch))?;
    }
    Ok(())
}
