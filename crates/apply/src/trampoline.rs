//! Catching a busy thread at the return of its outermost busy frame, in a way a dead
//! tracer cannot turn into a crash.
//!
//! A breakpoint at the return address kills the target if livecare dies while the
//! thread runs towards it (the kernel detaches, the thread hits `int3`, SIGTRAP). So
//! instead, the saved return address on the thread's stack (the *slot*) is replaced
//! with the address of a small trampoline in the region's header. The trampoline
//! marks the slot (the thread has returned), waits a bounded moment so the tracer can
//! stop it there, and jumps to the original return address, which is stored next to
//! it. It clobbers no register and no flag (`mov` and `loop` leave the flags alone;
//! `rcx` is saved below the stack pointer, inside the red zone the returned-from frame
//! no longer uses, which signal frames skip). If livecare dies at any moment, the
//! thread simply returns through the trampoline a few milliseconds late.
//!
//! The tracer: writes the original return address into the trampoline, swaps the
//! slot, runs the thread alone, polls the slot with `process_vm_readv`, then stops the
//! thread. A thread stopped inside the trampoline is moved to the original return
//! address with `rcx` restored; a thread that has not returned gets its slot back.
//! The region holding the trampoline stays mapped while any redirect may be live.

use std::time::{Duration, Instant};

use livecare_process::{Regs, RemoteMemory, ThreadSet, Tid};

use crate::safety::Busy;
use crate::unwind::{self, Unwinder};
use crate::Error;

/// Bytes reserved for the trampoline in the region header.
pub const LEN: usize = 48;
/// Offset of the 8-byte original return address inside the trampoline.
pub const ORIG_OFFSET: u64 = 0x22;
/// Offset of the first instruction after `rcx` is saved.
const SAVED_RCX_FROM: u64 = 0x05;
/// How far below the stack pointer (at trampoline entry) `rcx` is saved.
const RCX_BELOW_SP: u64 = 16;
/// Iterations of `pause` the trampoline waits for the tracer (about 1–10 ms,
/// depending on the CPU's `pause` latency).
const SPIN: u32 = 200_000;
/// What the trampoline writes into the slot once the thread has passed.
const MARK: u64 = 1;

/// The trampoline code (x86_64), with a zero original-address slot.
pub fn code() -> Vec<u8> {
    let mut c = Vec::with_capacity(LEN);
    c.extend_from_slice(&[0x48, 0x89, 0x4c, 0x24, 0xf0]); // mov %rcx,-0x10(%rsp)
    c.extend_from_slice(&[0x48, 0xc7, 0x44, 0x24, 0xf8]); // movq $MARK,-0x8(%rsp)
    c.extend_from_slice(&(MARK as u32).to_le_bytes());
    c.push(0xb9); // mov $SPIN,%ecx
    c.extend_from_slice(&SPIN.to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x90]); // spin: pause
    c.extend_from_slice(&[0xe2, 0xfc]); // loop spin
    c.extend_from_slice(&[0x48, 0x8b, 0x4c, 0x24, 0xf0]); // mov -0x10(%rsp),%rcx
    c.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]); // jmp *orig(%rip)
    debug_assert_eq!(c.len() as u64, ORIG_OFFSET);
    c.extend_from_slice(&0u64.to_le_bytes()); // orig
    c.resize(LEN, 0xcc);
    c
}

/// If `regs` is inside the trampoline at `tramp`, the registers the thread would have
/// at the original return address; None otherwise.
pub fn leave(mem: &RemoteMemory, tramp: u64, regs: &Regs) -> Result<Option<Regs>, Error> {
    if !(tramp..tramp + ORIG_OFFSET).contains(&regs.rip) {
        return Ok(None);
    }
    let mut r = *regs;
    if regs.rip >= tramp + SAVED_RCX_FROM {
        r.rcx = mem.read_u64(regs.rsp.wrapping_sub(RCX_BELOW_SP))?;
    }
    r.rip = mem.read_u64(tramp + ORIG_OFFSET)?;
    Ok(Some(r))
}

/// Undoes redirects through the trampoline at `tramp` that a dead livecare left behind:
/// every stopped thread inside it is moved out, and every word of its live stack that
/// holds the trampoline's address gets the original return address back. Returns how
/// many threads were fixed. All threads must be stopped.
pub fn undo_stale(threads: &ThreadSet, mem: &RemoteMemory, tramp: u64) -> Result<usize, Error> {
    let orig = mem.read_u64(tramp + ORIG_OFFSET)?;
    if orig == 0 {
        return Ok(0); // never used, or every redirect was resolved
    }
    let maps = livecare_process::read_maps(threads.pid())?;
    let mut fixed = 0;
    for tid in threads.tids() {
        if !threads.is_stopped(tid) {
            continue;
        }
        let regs = threads.regs(tid)?;
        if let Some(r) = leave(mem, tramp, &regs)? {
            threads.set_regs(tid, &r)?;
            fixed += 1;
            continue;
        }
        let Some(m) = maps
            .iter()
            .find(|m| m.start <= regs.rsp && regs.rsp < m.end)
        else {
            continue;
        };
        let lo = regs.rsp & !7;
        let Ok(stack) = mem.read_vec(lo, (m.end - lo) as usize) else {
            continue;
        };
        for (i, w) in stack.chunks_exact(8).enumerate() {
            if u64::from_le_bytes(w.try_into().unwrap_or_default()) == tramp {
                mem.write(lo + 8 * i as u64, &orig.to_le_bytes())?;
                fixed += 1;
            }
        }
    }
    mem.write(tramp + ORIG_OFFSET, &0u64.to_le_bytes())?;
    Ok(fixed)
}

/// Where the return address of `tid`'s outermost busy frame is stored, with its value:
/// the unwind is replayed with a recording stack reader, and the read that produced
/// that frame's return address is the slot.
pub fn return_slot(
    threads: &ThreadSet,
    mem: &RemoteMemory,
    unwinder: &mut Unwinder,
    tid: Tid,
    busy: &[Busy],
) -> Option<(u64, u64)> {
    let regs = threads.regs(tid).ok()?;
    let mut reads: Vec<(u64, u64)> = Vec::new();
    let mut read = |a: u64| {
        let v = mem.read_u64(a).ok()?;
        reads.push((a, v));
        Some(v)
    };
    let frames = unwinder
        .unwind(
            unwind::Regs {
                rip: regs.rip,
                rsp: regs.rsp,
                rbp: regs.rbp,
            },
            &mut read,
        )
        .ok()?;
    let exact = |pc: u64| busy.iter().any(|b| b.range.contains(&pc));
    let as_ret = |pc: u64| busy.iter().any(|b| pc > b.range.start && pc <= b.range.end);
    let outer = frames
        .iter()
        .enumerate()
        .rev()
        .find(|&(i, &pc)| if i == 0 { exact(pc) } else { as_ret(pc) })?
        .0;
    let ret = *frames.get(outer + 1)?;
    // Frame k's return address is the k-th read, in order, that yields frames[k]
    // (the other reads are frame pointers and saved registers: stack addresses).
    let mut k = 1;
    let mut slot = None;
    for &(a, v) in &reads {
        if k < frames.len() && v == frames[k] {
            if k == outer + 1 {
                slot = Some(a);
                break;
            }
            k += 1;
        }
    }
    let slot = slot?;
    (slot >= regs.rsp && mem.read_u64(slot).ok()? == ret).then_some((slot, ret))
}

/// How often the slot is polled while the thread runs alone.
const POLL: Duration = Duration::from_micros(20);

/// Redirects the return at `slot` (holding `ret`) through the trampoline at `tramp`,
/// runs only `tid` until it has returned or `timeout` passes, and stops it again.
/// True when the thread is now at `ret` or beyond (out of the frame); false when it
/// did not return (the slot holds `ret` again). Either way no redirect is left.
pub fn run_to_return(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    tid: Tid,
    slot: u64,
    ret: u64,
    tramp: u64,
    timeout: Duration,
) -> Result<bool, Error> {
    undo_stale(threads, mem, tramp)?;
    mem.write(tramp + ORIG_OFFSET, &ret.to_le_bytes())?;
    mem.write(slot, &tramp.to_le_bytes())?;
    let stat = format!("/proc/{}/task/{}/stat", threads.pid().0, tid.0);
    let run = (|| -> Result<(), Error> {
        threads.resume(tid)?;
        let deadline = Instant::now() + timeout;
        let mut n = 0u32;
        while Instant::now() < deadline {
            if mem.read_u64(slot)? != tramp {
                break;
            }
            n += 1;
            // A signal or clone stop would stall the thread until the deadline.
            if n.is_multiple_of(50) && ptrace_stopped(&stat) {
                break;
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    })();
    // Stop it again whatever happened (interrupt_all only waits for threads running).
    let stopped = threads.interrupt_all();
    let outcome = (|| -> Result<bool, Error> {
        run?;
        stopped?;
        let regs = threads.regs(tid)?;
        if let Some(r) = leave(mem, tramp, &regs)? {
            threads.set_regs(tid, &r)?;
            return Ok(true);
        }
        Ok(mem.read_u64(slot)? != tramp)
    })();
    // No redirect may outlive this call: a thread still in its frame gets `ret` back.
    if mem.read_u64(slot).ok() == Some(tramp) {
        mem.write(slot, &ret.to_le_bytes())?;
    }
    mem.write(tramp + ORIG_OFFSET, &0u64.to_le_bytes())?;
    tracing::debug!(tid = tid.0, ret, returned = ?outcome.as_ref().ok(), "run to return");
    outcome
}

/// True when the task is in a ptrace stop (state `t`).
fn ptrace_stopped(stat_path: &str) -> bool {
    std::fs::read_to_string(stat_path)
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('t'))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trampoline_fits_its_header_slot_and_ends_in_an_indirect_jump() {
        let c = code();
        assert_eq!(c.len(), LEN);
        assert_eq!(
            &c[ORIG_OFFSET as usize - 6..ORIG_OFFSET as usize],
            &[0xff, 0x25, 0, 0, 0, 0]
        );
        assert_eq!(
            &c[..SAVED_RCX_FROM as usize],
            &[0x48, 0x89, 0x4c, 0x24, 0xf0]
        );
    }
}
