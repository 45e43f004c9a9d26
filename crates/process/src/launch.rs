//! Starting a program under ptrace and stopping it at its entry point, after the
//! dynamic loader has mapped and relocated every library but before any of the
//! program's own code (constructors aside) ran.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use crate::{auxv, Error, Pid, RemoteMemory, ThreadSet, Tid, AT_ENTRY};

/// `int3`, the breakpoint planted at the entry point.
const INT3: u8 = 0xcc;

fn wait_stop(tid: i32) -> Result<i32, Error> {
    let mut status = 0;
    // SAFETY: plain syscall wrapper writing into a local int.
    let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    if r < 0 {
        return Err(Error::Wait(std::io::Error::last_os_error()));
    }
    if !libc::WIFSTOPPED(status) {
        return Err(Error::ThreadGone(Tid(tid)));
    }
    Ok(libc::WSTOPSIG(status))
}

/// Spawns `cmd` traced, runs it to `AT_ENTRY` and returns it stopped there, held by a
/// [`ThreadSet`] (dropping the set detaches and lets it run). The child is killed if
/// this process dies first.
pub fn launch_at_entry(mut cmd: Command) -> Result<(Child, ThreadSet), Error> {
    // SAFETY: only async-signal-safe calls (prctl, ptrace) run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // TRACEME: the child stops with SIGTRAP right after exec, before ld.so runs.
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Proc {
        path: format!("{cmd:?}"),
        err: e,
    })?;
    let pid = child.id() as i32;
    let sig = wait_stop(pid)?;
    if sig != libc::SIGTRAP {
        return Err(Error::Parse {
            path: format!("/proc/{pid}"),
            what: format!("expected SIGTRAP after exec, got signal {sig}"),
        });
    }
    run_to_entry(pid).map(|set| (child, set))
}

/// From the stop right after an exec of the traced single-threaded `pid`: plants a
/// breakpoint at `AT_ENTRY`, runs there and returns the process held, its pc back on
/// the entry instruction.
fn run_to_entry(pid: i32) -> Result<ThreadSet, Error> {
    let tid = Tid(pid);
    let entry = auxv(Pid(pid))?
        .into_iter()
        .find(|(k, _)| *k == AT_ENTRY)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::Parse {
            path: format!("/proc/{pid}/auxv"),
            what: "no AT_ENTRY".into(),
        })?;
    let mem = RemoteMemory::open(Pid(pid))?;
    let mut orig = [0u8; 1];
    mem.read(entry, &mut orig)?;
    mem.write(entry, &[INT3])?;
    // CONT with signal 0 swallows the exec SIGTRAP; the int3 stops it at the entry.
    // SAFETY: integer-only ptrace request on our traced child.
    if unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) } < 0 {
        let e = Error::ptrace("CONT", tid);
        // Never leave the breakpoint planted: a detached process would die on it.
        let _ = mem.write(entry, &orig);
        return Err(e);
    }
    let sig = wait_stop(pid).inspect_err(|_| {
        let _ = mem.write(entry, &orig);
    })?;
    mem.write(entry, &orig)?;
    let set = ThreadSet::adopt_stopped(Pid(pid))?;
    let mut regs = set.regs(tid)?;
    if sig != libc::SIGTRAP || regs.rip != entry + 1 {
        return Err(Error::Parse {
            path: format!("/proc/{pid}"),
            what: format!(
                "stopped by signal {sig} at {:#x}, not at the entry {entry:#x}",
                regs.rip
            ),
        });
    }
    // Back over the breakpoint: the entry instruction runs as if never trapped.
    regs.rip = entry;
    set.set_regs(tid, &regs)?;
    Ok(set)
}

/// Polls for the next stop of `tid` until `deadline`: the signal, or the ptrace
/// event (`status >> 16`) as a negative number.
fn wait_stop_until(tid: i32, deadline: std::time::Instant) -> Result<i32, Error> {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall wrapper writing into a local int.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        if r < 0 {
            return Err(Error::Wait(std::io::Error::last_os_error()));
        }
        if r == 0 {
            if std::time::Instant::now() > deadline {
                return Err(Error::Parse {
                    path: format!("/proc/{tid}"),
                    what: "it did not reach its exec in time".into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        if !libc::WIFSTOPPED(status) {
            return Err(Error::ThreadGone(Tid(tid)));
        }
        return Ok(match status >> 16 {
            0 => libc::WSTOPSIG(status),
            event => -event,
        });
    }
}

/// LibCare's start-up notification: `pid` (single-threaded, not yet traced) is about
/// to exec the program to patch and waits for our word. Attaches, calls `release` (which
/// tells it to go on), follows it through its `execve` (a trap it raises just before
/// is swallowed) and returns the new program held at its entry point, as
/// [`launch_at_entry`] does. Gives up (detached) after `timeout`.
pub fn follow_exec_to_entry(
    pid: Pid,
    release: impl FnOnce() -> std::io::Result<()>,
    timeout: std::time::Duration,
) -> Result<ThreadSet, Error> {
    let tid = Tid(pid.0);
    let deadline = std::time::Instant::now() + timeout;
    // ATTACH (not SEIZE): a stop now, and the same tracee kind `adopt_stopped` expects.
    // SAFETY: integer-only ptrace request.
    if unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid.0, 0usize, 0usize) } < 0 {
        return Err(Error::ptrace("ATTACH", tid));
    }
    let detach = |sig: i32| {
        // SAFETY: integer-only ptrace request on our tracee (ESRCH if it is gone).
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid.0, 0usize, sig as libc::c_long) };
    };
    let mut sig = match wait_stop_until(pid.0, deadline) {
        Ok(s) => s,
        Err(e) => {
            // The attach's SIGSTOP is still pending: take its stop first, or the
            // detach is refused and the process later stops under this tracer.
            let _ = wait_stop_until(pid.0, std::time::Instant::now() + timeout);
            detach(0);
            return Err(e);
        }
    };
    // The exec becomes an event stop, not a SIGTRAP that could be mistaken for the
    // waiter's own trap. SAFETY: integer-only ptrace request on a stopped tracee.
    if unsafe {
        libc::ptrace(
            libc::PTRACE_SETOPTIONS,
            pid.0,
            0usize,
            libc::PTRACE_O_TRACEEXEC as libc::c_long,
        )
    } < 0
    {
        let e = Error::ptrace("SETOPTIONS", tid);
        detach(0);
        return Err(e);
    }
    if let Err(e) = release() {
        detach(0);
        return Err(Error::Proc {
            path: format!("/proc/{pid}"),
            err: e,
        });
    }
    loop {
        // Our attach's SIGSTOP and the waiter's int3 are ours to swallow; any other
        // signal goes on to the process.
        let pass = if sig == libc::SIGSTOP || sig == libc::SIGTRAP || sig < 0 {
            0
        } else {
            sig
        };
        // SAFETY: integer-only ptrace request on a stopped tracee.
        if unsafe { libc::ptrace(libc::PTRACE_CONT, pid.0, 0usize, pass as libc::c_long) } < 0 {
            let e = Error::ptrace("CONT", tid);
            detach(0);
            return Err(e);
        }
        sig = match wait_stop_until(pid.0, deadline) {
            Ok(s) => s,
            Err(e) => {
                // Stop it (it may be running) so that the detach is accepted.
                // SAFETY: plain signal to our tracee.
                unsafe { libc::kill(pid.0, libc::SIGSTOP) };
                let _ = wait_stop_until(pid.0, std::time::Instant::now() + timeout);
                detach(libc::SIGCONT);
                return Err(e);
            }
        };
        if sig == -libc::PTRACE_EVENT_EXEC {
            break;
        }
    }
    // At the exec stop, as after PTRACE_TRACEME's exec SIGTRAP.
    run_to_entry(pid.0).inspect_err(|_| detach(0))
}
