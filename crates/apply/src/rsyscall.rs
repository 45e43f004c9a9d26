//! Remote syscalls a dead tracer cannot turn into a crash.
//!
//! The usual way (point a stopped thread at a `syscall` instruction with the syscall's
//! registers, single-step it, put the registers back) leaves the thread with foreign
//! registers, or with the trap flag set, for the length of a few ptrace round trips:
//! if livecare is killed then, the kernel lets the thread go on and it crashes
//! (SIGTRAP, or garbage registers after the syscall). Measured with SIGKILL at random
//! moments: about one death in a hundred unpatches.
//!
//! Here the thread runs a small stub instead: `syscall`, store the result, wait a
//! bounded moment (so the tracer can stop it there), restore every register it
//! touched from a frame below the thread's red zone, and jump back to where it was,
//! restarting an interrupted syscall as the kernel would. The tracer lets the thread
//! run only its `syscall` (PTRACE_SYSCALL: it stops at the syscall's entry and exit,
//! no trap flag involved), reads the result there, and puts the original registers
//! back. Whenever livecare dies, the thread completes the stub on its own and carries
//! on.
//!
//! The stub lives in the zero padding at the end of a file-backed executable mapping
//! (the end of a text segment's last page), written before each call and cleared
//! after; a stub left behind by a dead livecare is never executed again.

use std::time::Duration;

use livecare_process::{read_maps, MapEntry, Pid, Regs, RemoteMemory, ThreadSet};

use crate::Error;

/// Stub code (x86_64); `RESUME_AT` holds the 8-byte address it returns to. After the
/// syscall it waits, until `BUDGET` TSC ticks (about a second) have passed, before
/// restoring the thread. The tracer stops the thread at the syscall's exit and never
/// lets it get that far; a thread whose livecare died at a stop gets there, with the
/// result in its slot, and goes back on its own.
///
/// The wait sleeps in `ppoll(_, 0, &ts, NULL)` (`ts` in the frame, one second) rather
/// than spinning: a spinning thread keeps the CPU the tracer needs to notice the
/// result, which cost a whole scheduler slice (about 3 ms) per remote syscall on a
/// busy machine. `ppoll` keeps no restart block (unlike `nanosleep` or `poll`, whose
/// restart block would replace the one of a sleep the thread was interrupted in), and
/// the kernel writes the time left back into `ts`, so a sleep cut short by a signal
/// handler goes on for the rest. With `spin` (targets under a seccomp filter, which
/// might not allow `ppoll`) the `ppoll`'s `syscall` is a `pause` instead: the same
/// stub, busy-waiting as before.
fn stub(spin: bool) -> Vec<u8> {
    let mut c = vec![
        0x0f,
        0x05, // syscall
        0x48,
        0x89,
        0x44,
        0x24,
        RESULT_SLOT as u8, // mov %rax,RESULT(%rsp)
        0x0f,
        0x31, // rdtsc
        0x48,
        0xc1,
        0xe2,
        0x20, // shl $32,%rdx
        0x48,
        0x09,
        0xd0, // or %rdx,%rax
        0x48,
        0x03,
        0x44,
        0x24,
        BUDGET_SLOT as u8, // add BUDGET(%rsp),%rax
        0x48,
        0x89,
        0x44,
        0x24,
        BUDGET_SLOT as u8, // mov %rax,BUDGET(%rsp): the end tick, kept across syscalls
        0xb8,
        0x0f,
        0x01,
        0x00,
        0x00, // 1: mov $SYS_ppoll,%eax
        0x31,
        0xf6, // xor %esi,%esi: no descriptors (so %rdi is never read)
        0x48,
        0x8d,
        0x54,
        0x24,
        TS_SLOT as u8, // lea TS(%rsp),%rdx
        0x45,
        0x31,
        0xd2, // xor %r10d,%r10d: no signal mask
        0x0f,
        0x05, // syscall (pause when spinning)
        0x0f,
        0x31, // rdtsc
        0x48,
        0xc1,
        0xe2,
        0x20, // shl $32,%rdx
        0x48,
        0x09,
        0xd0, // or %rdx,%rax
        0x48,
        0x3b,
        0x44,
        0x24,
        BUDGET_SLOT as u8, // cmp END(%rsp),%rax
        0x72,
        0xdf, // jb 1b
        // pop %rax, %rdi, %rsi, %rdx, %r10, %r8, %r9, %rcx, %r11 (frame order)
        0x58,
        0x5f,
        0x5e,
        0x5a,
        0x41,
        0x5a,
        0x41,
        0x58,
        0x41,
        0x59,
        0x59,
        0x41,
        0x5b,
        0x9d, // popfq
        0x48,
        0x8d,
        0xa4,
        0x24, // lea FRAME-80+RED_ZONE(%rsp),%rsp: past the last slots
    ];
    if spin {
        c[WAIT_SYSCALL_AT..WAIT_SYSCALL_AT + 2].copy_from_slice(&[0xf3, 0x90]);
    }
    c.extend_from_slice(&((FRAME - 80 + RED_ZONE) as u32).to_le_bytes());
    c.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp *resume(%rip)
    debug_assert_eq!(c.len() as u64, RESUME_AT);
    c.extend_from_slice(&0u64.to_le_bytes());
    c
}

/// Offset of the wait's `syscall` (a `pause` in the spinning stub).
const WAIT_SYSCALL_AT: usize = 41;
/// Offset of the resume address in the stub.
const RESUME_AT: u64 = 0x57;
/// Frame slots (from the frame start): nine saved registers, rflags, then these.
const RESULT_SLOT: u64 = 10 * 8;
/// The wait budget in TSC ticks (the end tick once the stub has read the clock).
const BUDGET_SLOT: u64 = 11 * 8;
/// The `ppoll` timeout (struct timespec, two slots).
const TS_SLOT: u64 = 12 * 8;
/// The red zone of the x86_64 ABI, left untouched below the thread's stack pointer.
const RED_ZONE: u64 = 128;
/// Bytes of frame.
const FRAME: u64 = 14 * 8;
/// TSC ticks the stub waits after the syscall (about a second at 2-3 GHz).
const BUDGET: u64 = 2_000_000_000;
/// Seconds of each `ppoll` sleep: the TSC budget ends the wait at about this time.
const SLEEP_SECS: u64 = 1;
/// A value no syscall returns (not a small negative errno, not a user address).
const PENDING: u64 = 0x8000_0000_0000_0001;
/// The padding a stub takes.
const NEED: u64 = 96;
/// How long the syscall may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// True when `w` holds a stub (whatever its resume address): one a dead livecare
/// left behind.
fn is_stub(w: &[u8]) -> bool {
    let at = RESUME_AT as usize;
    w.len() == NEED as usize
        && [stub(false), stub(true)]
            .iter()
            .any(|code| w[..at] == code[..at] && w[code.len()..].iter().all(|&x| x == 0))
}

/// What a padding window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// Zeros: free for a stub or a mark.
    Free,
    /// A stub (a dead livecare's, or one in use now).
    Stub,
    /// A region mark (see [`crate::region::Mark`]).
    Mark,
}

/// Bytes of one padding window (a stub or a region mark).
pub(crate) const WINDOW: u64 = NEED;

/// The `NEED`-byte windows at the end of each file-backed executable mapping that
/// are page padding (all zero), stubs or region marks, from the end backwards,
/// stopping at the first window holding anything else (code).
pub(crate) fn padding_windows(
    mem: &RemoteMemory,
    maps: &[MapEntry],
    first_free_only: bool,
) -> Result<Vec<(u64, Window)>, Error> {
    let mut out = Vec::new();
    for m in maps {
        if !m.exec || !m.path.starts_with('/') {
            continue;
        }
        let len = (m.end - m.start).min(4096);
        let Ok(page) = mem.read_vec(m.end - len, len as usize) else {
            continue;
        };
        for w in page.rchunks_exact(NEED as usize) {
            let addr = m.end - len + (w.as_ptr() as usize - page.as_ptr() as usize) as u64;
            if w.iter().all(|&x| x == 0) {
                out.push((addr, Window::Free));
                if first_free_only {
                    // The stub's place: no need to read the other mappings' pages.
                    return Ok(out);
                }
            } else if is_stub(w) {
                out.push((addr, Window::Stub));
            } else if crate::region::Mark::decode(addr, w).is_some() {
                out.push((addr, Window::Mark));
            } else {
                break;
            }
        }
    }
    Ok(out)
}

/// A place for the stub: a padding window at the end of an executable mapping, not
/// one holding a stub a dead livecare left (a thread may still be finishing it).
fn stub_site(threads: &ThreadSet, mem: &RemoteMemory, maps: &[MapEntry]) -> Result<u64, Error> {
    padding_windows(mem, maps, true)?
        .into_iter()
        .find(|w| w.1 == Window::Free)
        .map(|w| w.0)
        .ok_or_else(|| {
            livecare_process::Error::RemoteSyscall {
                name: "any",
                tid: livecare_process::Tid(threads.pid().0),
                what: "no executable padding in the target for the remote-syscall stub".into(),
            }
            .into()
        })
}

/// True unless `/proc/PID/status` says the process has no seccomp filter: a filter
/// might kill it for the stub's `ppoll`, so the stub then spins instead.
fn under_seccomp_filter(pid: Pid) -> bool {
    let Ok(status) = livecare_process::read_proc_file(&format!("/proc/{}/status", pid.0), 4096)
    else {
        return true;
    };
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .is_none_or(|v| v.trim() != "0")
}

/// What remote syscalls into one process need, found once and reused for each:
/// where the stub goes and whether it must spin.
#[derive(Debug, Clone, Copy)]
pub struct Stub {
    /// Start of the padding window the stub is written to.
    site: u64,
    /// Busy-wait instead of sleeping (see [`stub`]).
    spin: bool,
}

/// One remote syscall: its name (for messages), number and arguments.
pub type Call = (&'static str, u64, [u64; 6]);

impl Stub {
    /// The padding window the stub is written to.
    pub fn site(&self) -> u64 {
        self.site
    }

    /// Finds the stub's place from `maps` (`/proc/PID/maps` of the target).
    pub fn find(threads: &ThreadSet, mem: &RemoteMemory, maps: &[MapEntry]) -> Result<Stub, Error> {
        Ok(Stub {
            site: stub_site(threads, mem, maps)?,
            spin: under_seccomp_filter(threads.pid()),
        })
    }

    /// Runs syscall `nr` in one thread of the target through the stub, stopping one
    /// thread briefly; negative results become errors. When the caller already holds
    /// stopped threads, the plain remote syscall is used instead.
    pub fn syscall(
        &self,
        threads: &mut ThreadSet,
        mem: &RemoteMemory,
        name: &'static str,
        nr: u64,
        args: [u64; 6],
    ) -> Result<u64, Error> {
        let (mut res, ran) = self.syscalls(threads, mem, &[(name, nr, args)], &|_, _| true);
        match res.pop() {
            Some(r) => r,
            None => Err(ran.err().unwrap_or_else(|| not_run(threads, name))),
        }
    }

    /// Runs `calls` in order in one thread, in one stop of it: after each result the
    /// thread, still in the stub (whose frame keeps its own registers, so a dead
    /// livecare leaves it safe at every step), is sent through the stub again for the
    /// next call, while `go_on(index, raw result)` says so. Returns the result of each
    /// call that ran (negative ones as errors) and whether the mechanics worked.
    pub fn syscalls(
        &self,
        threads: &mut ThreadSet,
        mem: &RemoteMemory,
        calls: &[Call],
        go_on: &dyn Fn(usize, u64) -> bool,
    ) -> (Vec<Result<u64, Error>>, Result<(), Error>) {
        let mut out = Vec::new();
        if threads.tids().into_iter().any(|t| threads.is_stopped(t)) {
            // Threads held by the caller (`run` holds a program it started, which dies
            // with livecare anyway, and whose tracee cannot be interrupted): the plain
            // single-stepped syscall, which never lets the thread run on.
            for (i, &(name, nr, args)) in calls.iter().enumerate() {
                match threads.syscall(name, nr, args) {
                    Ok(v) => {
                        out.push(Ok(v));
                        if !go_on(i, v) {
                            break;
                        }
                    }
                    Err(e) => {
                        out.push(Err(e.into()));
                        break;
                    }
                }
            }
            return (out, Ok(()));
        }
        // The window was padding when found; the target may have unmapped or replaced
        // the mapping since (dlclose): write the stub only over zeros. Writing the
        // zeros back now makes the kernel copy the page (copy-on-write, ~16 µs) before
        // the thread is stopped rather than while it is.
        if mem
            .read_vec(self.site, NEED as usize)
            .map_or(true, |w| w.iter().any(|&x| x != 0))
            || mem.write(self.site, &[0u8; NEED as usize]).is_err()
        {
            let name = calls.first().map_or("any", |c| c.0);
            let e = livecare_process::Error::RemoteSyscall {
                name,
                tid: livecare_process::Tid(threads.pid().0),
                what: format!("the stub's padding at {:#x} changed", self.site),
            };
            return (out, Err(e.into()));
        }
        let mut raw = Vec::new();
        let start = livecare_process::monotonic_ns();
        let ran = run(threads, mem, self.site, self.spin, calls, go_on, &mut raw);
        let pid = threads.pid();
        // The borrowed thread's hold, for `--json` (from before its INTERRUPT to after
        // its resume).
        livecare_process::stops::record(
            pid.0,
            format!(
                "{} borrow {}",
                threads.watch.label,
                calls.first().map_or("", |c| c.0)
            ),
            [start, livecare_process::monotonic_ns()],
        );
        let out = raw
            .into_iter()
            .zip(calls)
            .map(|(v, c)| errno_result(c.0, pid, v))
            .collect();
        (out, ran)
    }
}

/// A raw syscall result, negative errno values as errors.
fn errno_result(name: &'static str, pid: Pid, v: u64) -> Result<u64, Error> {
    let v = v as i64;
    if (-4095..0).contains(&v) {
        return Err(livecare_process::Error::RemoteSyscall {
            name,
            tid: livecare_process::Tid(pid.0),
            what: std::io::Error::from_raw_os_error(-v as i32).to_string(),
        }
        .into());
    }
    Ok(v as u64)
}

/// The error of a call that did not run although nothing failed (no calls given).
fn not_run(threads: &ThreadSet, name: &'static str) -> Error {
    livecare_process::Error::RemoteSyscall {
        name,
        tid: livecare_process::Tid(threads.pid().0),
        what: "not run".into(),
    }
    .into()
}

/// [`Stub::syscall`] with the stub's place found for this one call.
pub fn syscall(
    threads: &mut ThreadSet,
    name: &'static str,
    nr: u64,
    args: [u64; 6],
) -> Result<u64, Error> {
    if threads.tids().into_iter().any(|t| threads.is_stopped(t)) {
        return threads.syscall(name, nr, args).map_err(Error::from);
    }
    let mem = RemoteMemory::open(threads.pid())?;
    let maps = read_maps(threads.pid())?;
    Stub::find(threads, &mem, &maps)?.syscall(threads, &mem, name, nr, args)
}

/// Clears stubs dead livecares left behind that no stopped thread is executing;
/// returns how many. Every thread must be stopped.
pub fn clear_stale(threads: &ThreadSet, mem: &RemoteMemory) -> Result<usize, Error> {
    let mut pcs = Vec::new();
    for t in threads.tids() {
        pcs.push(threads.regs(t)?.rip);
    }
    let mut n = 0;
    for (addr, kind) in padding_windows(mem, &read_maps(threads.pid())?, false)? {
        if kind == Window::Stub && !pcs.iter().any(|pc| (addr..addr + NEED).contains(pc)) {
            mem.write(addr, &[0u8; NEED as usize])?;
            n += 1;
        }
    }
    Ok(n)
}

/// Where the thread goes on, and its `rax`, when the stub returns on its own: a
/// syscall it was interrupted in is restarted the way the kernel would.
fn resume_point(r: &Regs) -> (u64, u64) {
    const ERESTARTSYS: i64 = -512;
    const ERESTARTNOINTR: i64 = -513;
    const ERESTARTNOHAND: i64 = -514;
    const ERESTART_RESTARTBLOCK: i64 = -516;
    const NR_RESTART_SYSCALL: u64 = 219;
    if (r.orig_rax as i64) < 0 {
        return (r.rip, r.rax);
    }
    match r.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => (r.rip - 2, r.orig_rax),
        ERESTART_RESTARTBLOCK => (r.rip - 2, NR_RESTART_SYSCALL),
        _ => (r.rip, r.rax),
    }
}

/// Runs `calls` through the stub at `site`: stops one thread, points it at the stub
/// with a frame below its red zone, lets it run until each result is in (pushing the
/// raw results to `out`), puts its registers back and lets it go.
fn run(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    site: u64,
    spin: bool,
    calls: &[Call],
    go_on: &dyn Fn(usize, u64) -> bool,
    out: &mut Vec<u64>,
) -> Result<(), Error> {
    let Some(&(first, _, _)) = calls.first() else {
        return Ok(());
    };
    let tid = threads.stop_one()?;
    let saved = threads.regs(tid)?;
    let (resume_rip, resume_rax) = resume_point(&saved);
    let frame = (saved.rsp - RED_ZONE - FRAME) & !7;
    if frame + FRAME + RED_ZONE != saved.rsp {
        threads.resume(tid)?;
        return Err(livecare_process::Error::RemoteSyscall {
            name: first,
            tid,
            what: format!("misaligned stack pointer {:#x}", saved.rsp),
        }
        .into());
    }
    // The slots the stub changes (result, end tick, the sleep's time left), as they
    // must be before each pass through it.
    let fresh: Vec<u8> = [PENDING, BUDGET, SLEEP_SECS, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut f = Vec::with_capacity(FRAME as usize);
    for v in [
        resume_rax,
        saved.rdi,
        saved.rsi,
        saved.rdx,
        saved.r10,
        saved.r8,
        saved.r9,
        saved.rcx,
        saved.r11,
        saved.eflags,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&fresh);
    debug_assert_eq!(f.len() as u64, FRAME);
    let mut code = stub(spin);
    code[RESUME_AT as usize..].copy_from_slice(&resume_rip.to_le_bytes());
    mem.write(frame, &f)?;
    mem.write(site, &code)?;
    let in_stub = |rip: u64| (site..site + RESUME_AT).contains(&rip);
    let outcome = (|| -> Result<(), Error> {
        for (i, &(name, nr, args)) in calls.iter().enumerate() {
            let mut r = saved;
            r.rip = site;
            r.rsp = frame;
            r.rax = nr;
            r.orig_rax = u64::MAX; // not in a syscall: no restart on the way out of the stop
            r.rdi = args[0];
            r.rsi = args[1];
            r.rdx = args[2];
            r.r10 = args[3];
            r.r8 = args[4];
            r.r9 = args[5];
            // From here on the thread is safe whatever happens to us: the stub brings
            // it back.
            threads.set_regs(tid, &r)?;
            let v = run_call(threads, tid, name, &in_stub)?;
            out.push(v);
            if !go_on(i, v) {
                break;
            }
        }
        Ok(())
    })();
    // Still in the stub (the normal case): given back the registers it had, exactly,
    // at an interrupt stop, where the kernel itself restarts the syscall it was
    // interrupted in (or fails it with EINTR for a signal due then, as the handler's
    // SA_RESTART says). If that cannot be done, as the stub would do it: at the stop
    // it is at, a syscall it was in restarted here (unless a signal is to be
    // delivered: then the kernel decides). Otherwise it has already restored itself
    // and gone back.
    let mut back = saved;
    if !threads.has_pending_signals(tid) {
        (back.rip, back.rax) = (resume_rip, resume_rax);
        back.orig_rax = u64::MAX;
    }
    let mut resumed = None;
    let out_of_stub = match threads.regs(tid) {
        Ok(now) if in_stub(now.rip) => match threads.give_back(tid, &saved) {
            Ok(()) => {
                resumed = Some(Ok(()));
                true
            }
            Err(e) => {
                tracing::debug!("thread {tid} given back at the stop it is at: {e}");
                threads.set_regs(tid, &back).is_ok()
            }
        },
        Ok(_) => true,
        Err(_) => false,
    };
    let resumed = resumed.unwrap_or_else(|| threads.resume(tid));
    // Put the padding back once the thread is out, after letting it go: it never
    // comes back here (a stub left behind by a dead livecare is harmless: nothing
    // jumps there).
    if out_of_stub {
        let _ = mem.write(site, &vec![0u8; code.len()]);
    }
    resumed?;
    // Threads the borrowed one (or another) created meanwhile wait at their first
    // stop, their parents at a clone event: let them go now.
    threads.release_others()?;
    outcome
}

/// Lets `tid`, stopped with its registers at the stub's `syscall`, run that syscall
/// and stop at its exit; returns the raw result with the thread stopped in the stub
/// (just past the `syscall`, its frame intact).
fn run_call(
    threads: &mut ThreadSet,
    tid: livecare_process::Tid,
    name: &'static str,
    in_stub: &dyn Fn(u64) -> bool,
) -> Result<u64, Error> {
    let fail = |what: String| -> Error {
        livecare_process::Error::RemoteSyscall { name, tid, what }.into()
    };
    if !threads.run_one_syscall(tid, TIMEOUT)? {
        return Err(fail("did not complete".into()));
    }
    let r = threads.regs(tid)?;
    if !in_stub(r.rip) {
        return Err(fail(format!("the thread left the stub (pc {:#x})", r.rip)));
    }
    Ok(r.rax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_restores_its_frame_in_order_and_ends_in_an_indirect_jump() {
        for spin in [false, true] {
            let c = stub(spin);
            assert_eq!(c.len() as u64, RESUME_AT + 8);
            assert!(c.len() as u64 <= NEED);
            assert_eq!(&c[..2], &[0x0f, 0x05]);
            assert_eq!(
                &c[RESUME_AT as usize - 6..RESUME_AT as usize],
                &[0xff, 0x25, 0, 0, 0, 0]
            );
            assert!(is_stub(
                &[&c[..], &[0; (NEED - RESUME_AT - 8) as usize]].concat()
            ));
        }
    }

    /// Decodes the stub: the instructions, their order and the operands that depend on
    /// the frame layout, so a change of one constant cannot silently break the other.
    #[test]
    fn stub_sleeps_in_ppoll_on_its_frame_until_the_end_tick_then_pops_the_frame() {
        use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
        let decode = |spin: bool| {
            let c = stub(spin);
            let mut d = Decoder::with_ip(64, &c[..RESUME_AT as usize], 0, DecoderOptions::NONE);
            let mut v = Vec::new();
            while d.can_decode() {
                v.push(d.decode());
            }
            v
        };
        let ins = decode(false);
        let m: Vec<Mnemonic> = ins.iter().map(|i| i.mnemonic()).collect();
        use Mnemonic::*;
        assert_eq!(
            m,
            [
                Syscall, Mov, Rdtsc, Shl, Or, Add, Mov, Mov, Xor, Lea, Xor, Syscall, Rdtsc, Shl,
                Or, Cmp, Jb, Pop, Pop, Pop, Pop, Pop, Pop, Pop, Pop, Pop, Popfq, Lea, Jmp
            ]
        );
        let at = |i: usize| ins[i].ip() as usize;
        // The wait syscall is where the spinning variant puts its pause, and is ppoll.
        assert_eq!(at(11), WAIT_SYSCALL_AT);
        assert_eq!(ins[7].immediate32(), 271);
        assert_eq!(ins[7].op0_register(), Register::EAX);
        assert_eq!(ins[9].memory_displacement64(), TS_SLOT);
        assert_eq!(ins[1].memory_displacement64(), RESULT_SLOT);
        for i in [5, 6, 15] {
            assert_eq!(ins[i].memory_displacement64(), BUDGET_SLOT, "insn {i}");
        }
        // The loop goes back to the ppoll's number, not to the clock setup.
        assert_eq!(ins[16].op0_kind(), OpKind::NearBranch64);
        assert_eq!(ins[16].near_branch64(), at(7) as u64);
        // Nine registers and flags popped, then the stack pointer back to the thread's.
        assert_eq!(ins[27].memory_displacement64(), FRAME - 80 + RED_ZONE);
        assert_eq!(RESULT_SLOT, 80);
        const { assert!(TS_SLOT + 16 <= FRAME) };
        let spin = decode(true);
        assert_eq!(spin[11].mnemonic(), Pause);
        assert_eq!(spin.len(), ins.len());
    }

    #[test]
    fn an_interrupted_sleep_is_restarted_when_the_stub_returns_alone() {
        // SAFETY: user_regs_struct is plain data; zero is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x1002;
        r.orig_rax = 35; // nanosleep
        r.rax = (-516i64) as u64;
        assert_eq!(resume_point(&r), (0x1000, 219));
        r.rax = (-4i64) as u64; // EINTR is returned as is
        assert_eq!(resume_point(&r), (0x1002, (-4i64) as u64));
        r.orig_rax = u64::MAX;
        r.rax = 7;
        assert_eq!(resume_point(&r), (0x1002, 7));
    }
}
