//! Fencing against a real process (tests/fixtures/process-fence): workers blocked in
//! `read()` are fenced, not stopped; one woken while fenced waits at its syscall's exit
//! without running a user instruction; the rest are released, unwoken, when the tracing
//! OS thread exits.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use livecare_process::{Pid, ThreadSet, Tid};
use testkit::{Link, Running, Scratch};

const WAIT: Duration = Duration::from_secs(5);
const WORKERS: usize = 4;

/// The scheduler state letter of a task (`S` sleeping, `t` tracing stop, ...).
fn state(pid: Pid, tid: Tid) -> Result<char> {
    pid.task_state(tid)
        .with_context(|| format!("task {} is gone", tid.0))
}

/// The tracer of a task (0: none).
fn tracer(pid: Pid, tid: Tid) -> Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{}/task/{}/status", pid.0, tid.0))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .context("no TracerPid")?
        .trim()
        .parse()
        .context("TracerPid")
}

/// Waits until `f` holds, or fails after `WAIT`.
fn until(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f()? {
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Starts the fixture with [`WORKERS`] workers and waits until each sleeps in its
/// `read()` (a new thread may still be starting); returns it and its pipe's write end.
fn start(s: &Scratch) -> Result<(Running, std::fs::File)> {
    let src = testkit::fixture_dir("process-fence").join("fence.c");
    let exe = testkit::gcc(&[&src], &s.join("fence"), Link::Pie, &["-O2", "-pthread"])?;
    let mut p = Running::start(&exe, &[&WORKERS.to_string()])?;
    let ready = p.wait_for("ready wfd=", WAIT)?;
    let wfd = ready.rsplit('=').next().context("wfd")?.trim().to_string();
    let pid = Pid(p.pid() as i32);
    let pipe = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/fd/{wfd}", pid.0))?;
    let main = Tid(pid.0);
    until("every worker sleeps in its read", || {
        let tasks = pid.tasks()?;
        Ok(tasks.len() == WORKERS + 1
            && tasks
                .iter()
                .filter(|t| **t != main)
                .all(|t| state(pid, *t).ok() == Some('S')))
    })?;
    Ok((p, pipe))
}

#[test]
fn blocked_workers_are_fenced_not_stopped_and_released_unwoken_when_the_tracer_exits() -> Result<()>
{
    let s = Scratch::new()?;
    let (mut p, mut pipe) = start(&s)?;
    let pid = Pid(p.pid() as i32);
    let main = Tid(pid.0);

    // ptrace ties tracees to the OS thread that seized them: trace from one of ours,
    // so that its exit is the release of what is left fenced.
    let workers = std::thread::scope(|sc| {
        sc.spawn(|| -> Result<Vec<Tid>> {
            let mut set = ThreadSet::seize(pid)?;
            set.note_idle();
            // Long enough for the napping main thread to run (and be no candidate).
            std::thread::sleep(Duration::from_millis(30));
            let fenced = set.fence_idle()?;
            ensure!(fenced == WORKERS, "{fenced} fenced, want {WORKERS}");
            ensure!(!set.is_fenced(main), "the napping main thread was fenced");
            let workers: Vec<Tid> = set.tids().into_iter().filter(|t| *t != main).collect();
            for &t in &workers {
                ensure!(set.is_fenced(t) && set.is_held(t) && !set.is_stopped(t));
                // Back in its read() (it may still be on its way in for a moment),
                // not in a tracing stop; its registers are those of the read's entry.
                until(
                    "the worker sleeps in its read",
                    || Ok(state(pid, t)? == 'S'),
                )?;
                ensure!(set.regs(t)?.orig_rax == libc::SYS_read as u64);
            }

            // The commit's stop: only main is interrupted.
            set.interrupt_all()?;
            ensure!(set.is_stopped(main));
            ensure!(set.watch.last_fenced == WORKERS);
            for &t in &workers {
                // (A stopped worker would never be seen sleeping.)
                until("the worker sleeps, not stopped", || {
                    Ok(state(pid, t)? == 'S')
                })?;
            }

            // Wake one worker: its read returns, and it stops at the syscall's exit
            // before it can print.
            p.drain();
            pipe.write_all(b"x")?;
            until("a worker stops at its read's exit", || {
                Ok(workers
                    .iter()
                    .filter(|t| state(pid, **t).ok() == Some('t'))
                    .count()
                    == 1)
            })?;
            std::thread::sleep(Duration::from_millis(20));
            ensure!(
                p.wait_for("woke", Duration::from_millis(1)).is_err(),
                "a fenced worker ran user code"
            );

            // Release: main and the woken worker are detached and run on; the others
            // stay in their read, still ours until this thread exits.
            set.detach_all()?;
            p.wait_for("woke", WAIT)?;
            for &t in &workers {
                ensure!(state(pid, t)? != 't', "worker {t} left stopped");
            }
            ensure!(tracer(pid, main)? == 0);
            ensure!(
                workers
                    .iter()
                    .filter(|t| tracer(pid, **t).ok() != Some(0))
                    .count()
                    == WORKERS - 1,
                "the unwoken workers should still be traced by this thread"
            );
            Ok(workers)
        })
        .join()
        .expect("tracer thread")
    })?;

    // The tracing thread has exited: nobody traces anything, nothing was woken. (Its
    // join can return before the kernel has released its tracees: the joiner is woken
    // when the thread's memory is released, a step of its exit before that one.)
    for &t in &workers {
        until(&format!("worker {t} is no longer traced"), || {
            Ok(tracer(pid, t)? == 0)
        })?;
        ensure!(state(pid, t)? == 'S', "worker {t} is {}", state(pid, t)?);
    }
    ensure!(
        p.wait_for("woke", Duration::from_millis(50)).is_err(),
        "a worker woke with nothing to read"
    );
    // And every worker still works.
    pipe.write_all(&[b'y'; WORKERS])?;
    for _ in 0..WORKERS {
        p.wait_for("woke", WAIT)?;
    }
    ensure!(p.is_alive());
    Ok(())
}

#[test]
fn threads_left_fenced_are_taken_back_fenced_by_the_next_commit() -> Result<()> {
    let s = Scratch::new()?;
    let (mut p, mut pipe) = start(&s)?;
    let pid = Pid(p.pid() as i32);
    let main = Tid(pid.0);
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<()> {
            let mut set = ThreadSet::seize(pid)?;
            set.note_idle();
            std::thread::sleep(Duration::from_millis(30));
            ensure!(set.fence_idle()? == WORKERS);
            let before: Vec<(Tid, u64)> = set
                .tids()
                .into_iter()
                .filter(|t| set.is_fenced(*t))
                .map(|t| Ok((t, set.regs(t)?.rsp)))
                .collect::<Result<_>>()?;
            // First commit: released, the workers left fenced.
            set.interrupt_all()?;
            set.detach_all()?;
            ensure!(set.tids().is_empty());
            // Second commit of the same command: the workers come back fenced, with the
            // same registers, without being stopped; main is seized and stopped anew.
            ensure!(set.fence_idle()? == WORKERS);
            for (t, rsp) in &before {
                ensure!(set.is_fenced(*t) && set.regs(*t)?.rsp == *rsp);
            }
            set.interrupt_all()?;
            ensure!(set.is_stopped(main), "main not held by the second stop");
            ensure!(set.watch.last_fenced == WORKERS);
            for (t, _) in &before {
                until("the worker sleeps, not stopped", || {
                    Ok(state(pid, *t)? == 'S')
                })?;
            }
            p.drain();
            pipe.write_all(b"x")?;
            until("a worker stops at its read's exit", || {
                Ok(before
                    .iter()
                    .filter(|(t, _)| state(pid, *t).ok() == Some('t'))
                    .count()
                    == 1)
            })?;
            set.detach_all()?;
            p.wait_for("woke", WAIT)?;
            Ok(())
        })
        .join()
        .expect("tracer thread")
    })?;
    for t in pid.tasks()? {
        ensure!(tracer(pid, t)? == 0, "task {t} still traced");
        ensure!(state(pid, t)? != 't', "task {t} left stopped");
    }
    pipe.write_all(&[b'y'; WORKERS])?;
    for _ in 0..WORKERS {
        p.wait_for("woke", WAIT)?;
    }
    ensure!(p.is_alive());
    Ok(())
}

#[test]
fn threads_of_a_stopped_process_are_not_fenced_and_stay_stopped() -> Result<()> {
    let s = Scratch::new()?;
    let (mut p, mut pipe) = start(&s)?;
    let pid = Pid(p.pid() as i32);
    // SAFETY: kill with a pid we started and a valid signal.
    ensure!(unsafe { libc::kill(pid.0, libc::SIGSTOP) } == 0);
    until("every task is stopped", || {
        Ok(pid
            .tasks()?
            .iter()
            .all(|t| state(pid, *t).ok() == Some('T')))
    })?;
    std::thread::scope(|sc| {
        sc.spawn(|| -> Result<()> {
            let mut set = ThreadSet::seize(pid)?;
            set.note_idle();
            std::thread::sleep(Duration::from_millis(30));
            // Fencing would have to resume them from their group-stop.
            ensure!(set.fence_idle()? == 0, "a stopped thread was fenced");
            set.interrupt_all()?;
            set.detach_all()?;
            Ok(())
        })
        .join()
        .expect("tracer thread")
    })?;
    // A task detached in a group-stop is woken to re-enter it by itself (the kernel's
    // __ptrace_unlink): it may show R for a moment, then T without running user code
    // (checked below: no worker answers until SIGCONT).
    for t in pid.tasks()? {
        ensure!(tracer(pid, t)? == 0, "task {t} still traced");
        until(&format!("task {t} is back in its group-stop"), || {
            Ok(state(pid, t)? == 'T')
        })?;
    }
    p.drain();
    pipe.write_all(b"x")?;
    std::thread::sleep(Duration::from_millis(30));
    ensure!(
        p.wait_for("woke", Duration::from_millis(1)).is_err(),
        "a worker of the stopped process ran"
    );
    // SAFETY: as above.
    ensure!(unsafe { libc::kill(pid.0, libc::SIGCONT) } == 0);
    p.wait_for("woke", WAIT)?;
    ensure!(p.is_alive());
    Ok(())
}
