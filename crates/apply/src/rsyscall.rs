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
//! restarting an interrupted syscall as the kernel would. The tracer polls the result
//! slot, stops the thread and puts the exact original registers back. Whenever
//! livecare dies, the thread completes the stub on its own and carries on.
//!
//! The stub lives in the zero padding at the end of a file-backed executable mapping
//! (the end of a text segment's last page), written before each call and cleared
//! after; a stub left behind by a dead livecare is never executed again.

use std::time::{Duration, Instant};

use livecare_process::{read_maps, Regs, RemoteMemory, ThreadSet};

use crate::Error;

/// Stub code (x86_64); `RESUME_AT` holds the 8-byte address it returns to. After the
/// syscall it waits `BUDGET` TSC ticks (about a second) before restoring the thread:
/// the tracer normally stops it there within microseconds, and a thread never runs
/// on while the tracer still needs the result slot.
fn stub() -> Vec<u8> {
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
        0xc1, // mov %rax,%rcx: the end tick
        0xf3,
        0x90, // 1: pause
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
        0x39,
        0xc8, // cmp %rcx,%rax
        0x72,
        0xf0, // jb 1b
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
        0x24, // lea 16+RED_ZONE(%rsp),%rsp: past the last slots
    ];
    c.extend_from_slice(&((16 + RED_ZONE) as u32).to_le_bytes());
    c.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp *resume(%rip)
    debug_assert_eq!(c.len() as u64, RESUME_AT);
    c.extend_from_slice(&0u64.to_le_bytes());
    c
}

/// Offset of the resume address in the stub.
const RESUME_AT: u64 = 0x44;
/// Frame slots (from the frame start): nine saved registers, rflags, then these.
const RESULT_SLOT: u64 = 10 * 8;
/// The wait budget in TSC ticks.
const BUDGET_SLOT: u64 = 11 * 8;
/// The red zone of the x86_64 ABI, left untouched below the thread's stack pointer.
const RED_ZONE: u64 = 128;
/// Bytes of frame.
const FRAME: u64 = 12 * 8;
/// TSC ticks the stub waits after the syscall (about a second at 2-3 GHz).
const BUDGET: u64 = 2_000_000_000;
/// A value no syscall returns (not a small negative errno, not a user address).
const PENDING: u64 = 0x8000_0000_0000_0001;
/// The padding a stub takes.
const NEED: u64 = 96;
/// How long the syscall may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// True when `w` holds a stub (whatever its resume address): one a dead livecare
/// left behind.
fn is_stub(w: &[u8]) -> bool {
    let code = stub();
    w.len() == NEED as usize
        && w[..RESUME_AT as usize] == code[..RESUME_AT as usize]
        && w[code.len()..].iter().all(|&x| x == 0)
}

/// The `NEED`-byte windows at the end of each file-backed executable mapping that
/// are page padding (all zero) or stale stubs, from the end backwards, stopping at
/// the first window holding anything else (code).
fn padding_windows(threads: &ThreadSet, mem: &RemoteMemory) -> Result<Vec<(u64, bool)>, Error> {
    let mut out = Vec::new();
    for m in read_maps(threads.pid())? {
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
                out.push((addr, false));
            } else if is_stub(w) {
                out.push((addr, true));
            } else {
                break;
            }
        }
    }
    Ok(out)
}

/// A place for the stub: a padding window at the end of an executable mapping, not
/// one holding a stub a dead livecare left (a thread may still be finishing it).
fn stub_site(threads: &ThreadSet, mem: &RemoteMemory) -> Result<u64, Error> {
    padding_windows(threads, mem)?
        .into_iter()
        .find(|w| !w.1)
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

/// Clears stubs dead livecares left behind that no stopped thread is executing;
/// returns how many. Every thread must be stopped.
pub fn clear_stale(threads: &ThreadSet, mem: &RemoteMemory) -> Result<usize, Error> {
    let mut pcs = Vec::new();
    for t in threads.tids() {
        pcs.push(threads.regs(t)?.rip);
    }
    let mut n = 0;
    for (addr, stale) in padding_windows(threads, mem)? {
        if stale && !pcs.iter().any(|pc| (addr..addr + NEED).contains(pc)) {
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

/// Runs syscall `nr` in one thread of the target through the stub, stopping one
/// thread briefly; negative results become errors. When the caller already holds
/// stopped threads, the plain remote syscall is used instead.
pub fn syscall(
    threads: &mut ThreadSet,
    name: &'static str,
    nr: u64,
    args: [u64; 6],
) -> Result<u64, Error> {
    let had_stopped = threads.tids().into_iter().any(|t| threads.is_stopped(t));
    if had_stopped {
        // Threads held by the caller (`run` holds a program it started, which dies
        // with livecare anyway, and whose tracee cannot be interrupted): the plain
        // single-stepped syscall, which never lets the thread run on.
        return threads.syscall(name, nr, args).map_err(Error::from);
    }
    let mem = RemoteMemory::open(threads.pid())?;
    let site = stub_site(threads, &mem)?;
    let tid = threads.stop_one()?;
    let saved = threads.regs(tid)?;
    let (resume_rip, resume_rax) = resume_point(&saved);
    let frame = (saved.rsp - RED_ZONE - FRAME) & !7;
    if frame + FRAME + RED_ZONE != saved.rsp {
        return Err(livecare_process::Error::RemoteSyscall {
            name,
            tid,
            what: format!("misaligned stack pointer {:#x}", saved.rsp),
        }
        .into());
    }
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
        PENDING,
        BUDGET,
    ] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let mut code = stub();
    code[RESUME_AT as usize..].copy_from_slice(&resume_rip.to_le_bytes());
    mem.write(frame, &f)?;
    mem.write(site, &code)?;
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
    // From here on the thread is safe whatever happens to us: the stub brings it back.
    threads.set_regs(tid, &r)?;
    let deadline = Instant::now() + TIMEOUT;
    let in_stub = |rip: u64| (site..site + RESUME_AT).contains(&rip);
    let outcome = (|| -> Result<u64, Error> {
        loop {
            // Short slices: the stub waits for us after the syscall, and the thread
            // is stopped again at the end of each slice.
            let slot = frame + RESULT_SLOT;
            threads.run_one_until(tid, Duration::from_micros(200), &mut || {
                mem.read_u64(slot).is_ok_and(|v| v != PENDING)
            })?;
            if !in_stub(threads.regs(tid)?.rip) {
                // Only after a second without us: the slot may be overwritten since.
                return Err(livecare_process::Error::RemoteSyscall {
                    name,
                    tid,
                    what: "the thread left the stub before its result was read".into(),
                }
                .into());
            }
            let v = mem.read_u64(frame + RESULT_SLOT)?;
            if v != PENDING {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(livecare_process::Error::RemoteSyscall {
                    name,
                    tid,
                    what: "did not complete".into(),
                }
                .into());
            }
        }
    })();
    // Still in the stub (the normal case): exactly the registers it had. Otherwise it
    // has already restored itself and gone back.
    if let Ok(now) = threads.regs(tid) {
        if in_stub(now.rip) {
            threads.set_regs(tid, &saved)?;
        }
        // Put the padding back once the thread is out (a stub left behind by a dead
        // livecare is harmless: nothing jumps there).
        if threads.regs(tid).is_ok_and(|r| !in_stub(r.rip)) {
            let _ = mem.write(site, &vec![0u8; code.len()]);
        }
    }
    threads.resume(tid)?;
    let v = outcome? as i64;
    if (-4095..0).contains(&v) {
        return Err(livecare_process::Error::RemoteSyscall {
            name,
            tid,
            what: std::io::Error::from_raw_os_error(-v as i32).to_string(),
        }
        .into());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_restores_its_frame_in_order_and_ends_in_an_indirect_jump() {
        let c = stub();
        assert_eq!(c.len() as u64, RESUME_AT + 8);
        assert!(c.len() as u64 <= NEED);
        assert_eq!(&c[..2], &[0x0f, 0x05]);
        assert_eq!(
            &c[RESUME_AT as usize - 6..RESUME_AT as usize],
            &[0xff, 0x25, 0, 0, 0, 0]
        );
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
