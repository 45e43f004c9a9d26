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
    let tid = Tid(pid);
    let sig = wait_stop(pid)?;
    if sig != libc::SIGTRAP {
        return Err(Error::Parse {
            path: format!("/proc/{pid}"),
            what: format!("expected SIGTRAP after exec, got signal {sig}"),
        });
    }
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
        return Err(Error::ptrace("CONT", tid));
    }
    let sig = wait_stop(pid)?;
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
    Ok((child, set))
}
