//! The safety check: is any thread executing, or due to return into, code we are
//! about to replace?
//!
//! Each stopped thread's stack (from its stack pointer to the end of its stack mapping)
//! is read in one bulk read. It is then judged two ways, and it is safe if either
//! proves it:
//! 1. a strict CFI unwind ([`crate::unwind`], tables built before the stop) yields every
//!    frame and none is inside a busy range;
//! 2. no word of the live stack points into a busy range and the PC is outside them.
//!    This scan is conservative (it cannot miss a return address, so it is sound even
//!    where CFI is missing, e.g. patch code made without `.eh_frame`), but stale words
//!    left in live frames' padding can make it report false positives, which is why the
//!    unwind comes first.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use livecare_process::{Bytes, LoadedObject, MapEntry, Regs, RemoteMemory, ThreadSet, Tid};

use crate::bare::{BareCode, BareFn};
use crate::region::RegionHeader;
use crate::unwind::{CodeModule, Regs as UnwindRegs, Unwinder};
use crate::Error;

/// A code range that must not be in use, with the function's name.
#[derive(Debug, Clone)]
pub struct Busy {
    /// Addresses.
    pub range: Range<u64>,
    /// Function (for messages).
    pub name: String,
}

fn stack_map(maps: &[MapEntry], sp: u64) -> Option<&MapEntry> {
    maps.iter().find(|m| m.start <= sp && sp < m.end)
}

/// Unwind tables for every piece of code in the target, built while it runs.
pub fn build_unwinder(
    mem: &RemoteMemory,
    maps: &[MapEntry],
    objects: &[LoadedObject],
    regions: &[RegionHeader],
) -> Unwinder {
    let mut modules = Vec::new();
    for o in objects {
        if o.data.is_empty() {
            continue;
        }
        for m in maps.iter().filter(|m| m.exec && m.path == o.path) {
            if let Some(cm) = cached_module(o) {
                modules.push(cm.rebased(o.load_bias, m.start..m.end));
            }
        }
    }
    if let Some(v) = maps.iter().find(|m| m.path == "[vdso]") {
        if let Ok(bytes) = mem.read_vec(v.start, (v.end - v.start) as usize) {
            if let Some(cm) = cached_vdso(bytes) {
                modules.push(cm.rebased(v.start, v.start..v.end));
            }
        }
    }
    let mut bare = Vec::new();
    for r in regions {
        let eh = (r.eh_frame != 0 && r.eh_frame_len != 0)
            .then(|| mem.read_vec(r.eh_frame, r.eh_frame_len as usize).ok())
            .flatten();
        let module = eh.and_then(|eh| {
            CodeModule::from_eh_frame(
                format!("patch {}", r.patch_id),
                eh,
                r.eh_frame,
                r.addr..r.addr + r.exec_len,
            )
            .ok()
        });
        // A zeroed `.eh_frame` parses as an empty one: no more use than none.
        if let Some(cm) = module.filter(|m| m.fde_count() > 0) {
            modules.push(cm);
        } else if let Ok(bytes) = mem.read_vec(r.addr, r.exec_len as usize) {
            // No usable CFI (peer-made patches): its functions are still known.
            bare.push(BareCode {
                range: r.addr..r.addr + r.exec_len,
                bytes,
                functions: r
                    .hunks
                    .iter()
                    .map(|h| BareFn {
                        code: h.saddr..h.saddr + u64::from(h.slen),
                        callees: vec![h.daddr, h.saddr],
                    })
                    .collect(),
            });
        }
    }
    let mut u = Unwinder::new(modules);
    for b in bare {
        u.add_bare(b);
    }
    u
}

/// The unwind module of an object file, built once per invocation and shared by every
/// process that maps it (`-p all` would otherwise index libc's CFI once per process).
/// Keyed by path, build-id and the file bytes' identity (the object cache shares them
/// per file identity; each entry keeps its bytes alive so the address is never reused),
/// so a replaced file is never served stale tables.
fn cached_module(o: &LoadedObject) -> Option<CodeModule> {
    type Key = (String, Option<String>, usize, usize);
    type Entry = (Bytes, Option<CodeModule>);
    static CACHE: OnceLock<Mutex<HashMap<Key, Entry>>> = OnceLock::new();
    let key = (
        o.path.clone(),
        o.build_id.clone(),
        o.data.as_ptr() as usize,
        o.data.len(),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some((_, hit)) = cache.lock().ok()?.get(&key) {
        return hit.clone();
    }
    // Built outside the lock: parallel jobs do not wait on each other's parsing.
    let built = CodeModule::from_elf(o.path.clone(), o.data.clone(), 0, 0..0).ok();
    cache
        .lock()
        .ok()?
        .insert(key, (o.data.clone(), built.clone()));
    built
}

/// The unwind module of the vdso, parsed once per invocation: every process of one
/// kernel maps the same vdso (checked by its bytes), only at another address.
fn cached_vdso(bytes: Vec<u8>) -> Option<CodeModule> {
    type Entry = (Bytes, Option<CodeModule>);
    static CACHE: OnceLock<Mutex<Vec<Entry>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((_, hit)) = cache.lock().ok()?.iter().find(|(b, _)| **b == *bytes) {
        return hit.clone();
    }
    let bytes = Bytes::from(bytes);
    let built = CodeModule::from_elf("[vdso]".into(), bytes.clone(), 0, 0..0).ok();
    cache.lock().ok()?.push((bytes, built.clone()));
    built
}

/// A thread found inside a busy range.
#[derive(Debug, Clone)]
pub struct Offender {
    /// The thread.
    pub tid: Tid,
    /// The busy function.
    pub name: String,
    /// Where the outermost busy frame returns to, when the stack was fully unwound:
    /// once the thread gets there it is out of every busy function.
    pub return_to: Option<u64>,
}

/// What a stop reads besides the stacks of the threads it judges, prepared before it.
///
/// The caller's ranges (the code spans to be written) and the top [`MAIN_STACK_SCAN`]
/// bytes of `[stack]` are read before any thread's registers when the main thread is
/// judged: a thread's registers can be read only once it has left its CPU, which on
/// this VM takes 5–16 µs after its stop is reported, and this read fills that time.
/// The main thread's frames are usually in that window (while it runs its loop, its
/// stack pointer sits a few KiB below the top, and the unwind reads up to `_start`);
/// when they are not, its stack is read with the others', after the registers.
#[derive(Default)]
pub struct StopReads {
    /// Ranges read for the caller, in order.
    also: Vec<(u64, usize)>,
    /// Their buffers, in the same order, allocated and touched before the stop (an
    /// allocation inside it cost about 2 µs of pause).
    also_bufs: Vec<Vec<u8>>,
    /// Whether each of them holds the bytes of the current stop.
    also_ok: Vec<bool>,
    /// Start of the window at the top of `[stack]`, and its buffer (touched here: the
    /// first touch of a fresh page costs microseconds on this VM).
    window: Option<(u64, Vec<u8>)>,
    /// Whether `window` holds the bytes of the current stop.
    window_read: bool,
}

impl StopReads {
    /// The reads of a stop that also reads `also` for the caller.
    pub fn new(maps: &[MapEntry], also: Vec<(u64, usize)>) -> StopReads {
        let window =
            main_stack_window(maps).map(|w| (w.start, vec![0u8; (w.end - w.start) as usize]));
        StopReads {
            also_bufs: also.iter().map(|&(_, len)| vec![0u8; len]).collect(),
            also_ok: vec![false; also.len()],
            also,
            window,
            window_read: false,
        }
    }

    /// The bytes of the caller's range `i` as read in this stop (`None`: unreadable).
    pub fn also(&self, i: usize) -> Option<&[u8]> {
        self.also_ok
            .get(i)
            .filter(|ok| **ok)
            .and_then(|_| self.also_bufs.get(i))
            .map(Vec::as_slice)
    }

    /// The caller's ranges and their buffers, for one batched read.
    fn also_into(&mut self) -> impl Iterator<Item = (u64, &mut [u8])> {
        self.also
            .iter()
            .zip(self.also_bufs.iter_mut())
            .map(|(&(addr, _), b)| (addr, b.as_mut_slice()))
    }

    /// Makes this stop's reads once, just before it (see `ThreadSet::rehearse`): cold,
    /// each costs several times more on this VM. The window is read into its own
    /// buffer, which also touches the buffer's pages.
    pub fn rehearse(&mut self, mem: &RemoteMemory) {
        mem.rehearse(&self.also);
        if let Some((start, buf)) = &mut self.window {
            let _ = mem.read_ranges_into(&mut [(*start, buf.as_mut_slice())]);
        }
    }

    /// Reads `also` and the window, before any register.
    fn read_early(&mut self, mem: &RemoteMemory) {
        let Some((start, mut window)) = self.window.take() else {
            return;
        };
        let mut into: Vec<(u64, &mut [u8])> = self.also_into().collect();
        into.push((start, window.as_mut_slice()));
        let mut ok = mem.read_ranges_into(&mut into);
        self.window = Some((start, window));
        self.window_read = ok.pop().unwrap_or(false);
        self.also_ok = ok;
    }

    /// The stack `[lo, end)` from the window, if it holds all of it.
    fn stack_from_window(&self, lo: u64, end: u64) -> Option<&[u8]> {
        let (start, buf) = self.window.as_ref().filter(|_| self.window_read)?;
        let top = start + buf.len() as u64;
        (lo >= *start && end == top).then(|| &buf[(lo - start) as usize..])
    }
}

/// The safety check of one stop, once every thread is stopped: reads every stack (and
/// the ranges of `reads`) in as few batched reads as it can, judges each held thread
/// that `pick` names, and returns the offenders in thread-id order. (Judging threads as
/// their stops arrived, to overlap the wait for the others, measured slower: see
/// `ThreadSet::interrupt_all`.)
pub fn offenders(
    threads: &ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    unwinder: &mut Unwinder,
    busy: &[Busy],
    reads: &mut StopReads,
    pick: &dyn Fn(Tid) -> bool,
) -> Result<Vec<Offender>, Error> {
    // Maps re-read once when a stack is not in `maps` (a thread started meanwhile).
    let mut fresh: Option<Vec<MapEntry>> = None;
    let mut held = Vec::new();
    let mut found: Vec<Offender> = Vec::new();
    let main = Tid(threads.pid().0);
    let early = threads.is_stopped(main) && !threads.is_fenced(main) && pick(main);
    reads.window_read = false;
    if early {
        reads.read_early(mem);
    }
    for tid in threads.tids() {
        // A fenced thread is judged from the registers of its syscall entry: it runs
        // no user code until it stops at the syscall's exit.
        if !threads.is_held(tid) || !pick(tid) {
            continue;
        }
        let regs = threads.regs(tid)?;
        let end = match stack_map(maps, regs.rsp) {
            Some(m) => Some(m.end),
            None => {
                if fresh.is_none() {
                    fresh = Some(livecare_process::read_maps(threads.pid())?);
                }
                fresh
                    .as_deref()
                    .and_then(|f| stack_map(f, regs.rsp))
                    .map(|m| m.end)
            }
        };
        match end {
            Some(end) => held.push((tid, regs, regs.rsp & !7, end)),
            None => found.push(offender(tid, "an unknown stack".into(), None)),
        }
    }
    // The frames are usually within a page of the stack pointer, while the mapping's
    // top holds thread descriptors and TLS: read the near part for every thread in the
    // batch and the rest only when a walk or scan needs it (cost is per page).
    let mut bufs: Vec<(u64, Vec<u8>)> = held
        .iter()
        .filter(|&&(_, _, lo, end)| reads.stack_from_window(lo, end).is_none())
        .map(|&(_, _, lo, end)| (lo, vec![0u8; (near_end(lo, end) - lo) as usize]))
        .collect();
    let also_late = !early || reads.window.is_none();
    let mut into: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .map(|(lo, b)| (*lo, b.as_mut_slice()))
        .collect();
    if also_late {
        into.extend(reads.also_into());
    }
    let mut ok = mem.read_ranges_into(&mut into);
    drop(into);
    if also_late {
        reads.also_ok = ok.split_off(bufs.len());
    }
    let mut late = bufs.into_iter().zip(ok).map(|((_, b), ok)| ok.then_some(b));
    let stacks: Vec<Option<Cow<[u8]>>> = held
        .iter()
        .map(
            |&(tid, _, lo, end)| match reads.stack_from_window(lo, end) {
                Some(s) => {
                    tracing::debug!(tid = tid.0, "stack read before the registers");
                    Some(Cow::Borrowed(s))
                }
                None => late.next().flatten().map(Cow::Owned),
            },
        )
        .collect();
    for ((tid, regs, lo, end), stack) in held.into_iter().zip(stacks) {
        if let Some(off) = judge(mem, unwinder, busy, tid, &regs, lo, end, stack) {
            found.push(off);
        }
    }
    found.sort_by_key(|o| o.tid);
    Ok(found)
}

fn offender(tid: Tid, name: String, return_to: Option<u64>) -> Offender {
    Offender {
        tid,
        name,
        return_to,
    }
}

/// Judges one stopped thread from its registers and the near part of its stack
/// `[lo, ..)` (`None`: unreadable); the rest up to `end` is read only if needed.
#[allow(clippy::too_many_arguments)]
fn judge(
    mem: &RemoteMemory,
    unwinder: &mut Unwinder,
    busy: &[Busy],
    tid: Tid,
    regs: &Regs,
    lo: u64,
    end: u64,
    stack: Option<Cow<[u8]>>,
) -> Option<Offender> {
    let in_busy_exact = |pc: u64| busy.iter().find(|b| b.range.contains(&pc));
    // A return address points just after a call: inside (start, end].
    let in_busy_ret = |v: u64| busy.iter().find(|b| v > b.range.start && v <= b.range.end);
    let top_busy = in_busy_exact(regs.rip);
    let Some(mut stack) = stack else {
        return Some(offender(tid, "an unreadable stack".into(), None));
    };
    // Appends the far part of the stack once; false if it cannot be read.
    let complete = |stack: &mut Cow<[u8]>| -> bool {
        let have = lo + stack.len() as u64;
        if have >= end {
            return true;
        }
        match mem.read_vec(have, (end - have) as usize) {
            Ok(rest) => {
                stack.to_mut().extend_from_slice(&rest);
                true
            }
            Err(_) => false,
        }
    };
    let mut read = |addr: u64| -> Option<u64> {
        if addr >= lo && addr + 8 <= end {
            if addr + 8 > lo + stack.len() as u64 && !complete(&mut stack) {
                return None;
            }
            let o = (addr - lo) as usize;
            return Some(u64::from_le_bytes(stack[o..o + 8].try_into().ok()?));
        }
        mem.read_u64(addr).ok()
    };
    let unwound = unwinder.unwind(
        UnwindRegs {
            rip: regs.rip,
            rsp: regs.rsp,
            rbp: regs.rbp,
        },
        &mut read,
    );
    if let Ok(frames) = &unwound {
        let busy_at = |i: usize, pc: u64| if i == 0 { top_busy } else { in_busy_ret(pc) };
        let outermost = frames
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, &pc)| busy_at(i, pc).map(|b| (i, b)));
        return outermost.map(|(i, b)| offender(tid, b.name.clone(), frames.get(i + 1).copied()));
    }
    if let Some(b) = top_busy {
        return Some(offender(tid, b.name.clone(), None));
    }
    // No complete unwind: fall back to the conservative scan of the whole stack.
    if !complete(&mut stack) {
        return Some(offender(tid, "an unreadable stack".into(), None));
    }
    for w in stack.chunks_exact(8) {
        let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
        if let Some(b) = in_busy_ret(v) {
            let why = unwound
                .err()
                .map(|e| format!(" (stack not unwindable: {e})"))
                .unwrap_or_default();
            return Some(offender(tid, format!("{}{why}", b.name), None));
        }
    }
    None
}

/// End of the part of a stack read in the first batch: 1 KiB past the stack pointer
/// (at most `end`), which holds the frames of a thread waiting in a syscall.
fn near_end(lo: u64, end: u64) -> u64 {
    (lo + 1024).min(end)
}

/// The top [`MAIN_STACK_SCAN`] bytes of `[stack]`, where a running main thread's frames
/// usually are.
fn main_stack_window(maps: &[MapEntry]) -> Option<Range<u64>> {
    let stack = maps.iter().find(|m| m.path == "[stack]")?;
    Some(stack.end.saturating_sub(MAIN_STACK_SCAN).max(stack.start)..stack.end)
}

/// How much of the top of a running main thread's stack [`prewarm`] scans for return
/// addresses (and the commit reads before the registers), and how many it warms at most.
const MAIN_STACK_SCAN: u64 = 16 << 10;
const MAIN_STACK_WARM: usize = 48;

/// Warms the unwinder's rule cache before the stop, so the walks inside it mostly hit
/// the cache. A thread blocked in a syscall shows its stack pointer and pc in
/// `/proc/PID/task/TID/syscall` without being stopped, and its frames stay put while it
/// is blocked; walking them now (results discarded: the stack may change at any time)
/// derives the CFI rules of exactly the addresses the commit will look up. A running
/// main thread shows neither, but its outer frames (`_start`, libc's start code, `main`
/// and its loop) sit near the top of `[stack]`: the code addresses found there are
/// warmed as return addresses, with every row of the functions they return into, and so
/// are the vDSO's functions: a busy thread's top frame is usually in one of them. (A cold
/// walk of one busy thread took about 10 µs of the stop, a warm one well under 1 µs; the
/// first step from a cold top frame 3 µs, the other five steps 0.7 µs together.)
pub fn prewarm(
    unwinder: &mut Unwinder,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    threads: &ThreadSet,
) {
    let pid = threads.pid();
    // A busy thread is often in the vDSO's clock functions when it stops.
    unwinder.warm_module("[vdso]");
    let mut buf = [0u8; 256];
    for tid in threads.tids() {
        let Ok(mut f) = std::fs::File::open(format!("/proc/{}/task/{}/syscall", pid.0, tid.0))
        else {
            continue;
        };
        let Ok(n) = std::io::Read::read(&mut f, &mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        let fields: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        // "nr a1..a6 sp pc" when blocked in a syscall; "running" otherwise.
        let [.., sp, pc] = fields[..] else {
            if tid.0 == pid.0 {
                warm_main_stack(unwinder, mem, maps);
            }
            continue;
        };
        let Some(m) = stack_map(maps, sp) else {
            continue;
        };
        let lo = sp & !7;
        let Ok(stack) = mem.read_vec(lo, (near_end(lo, m.end) - lo) as usize) else {
            continue;
        };
        let mut read = |addr: u64| -> Option<u64> {
            let o = addr.checked_sub(lo)? as usize;
            Some(u64::from_le_bytes(stack.get(o..o + 8)?.try_into().ok()?))
        };
        let _ = unwinder.unwind(
            UnwindRegs {
                rip: pc,
                rsp: sp,
                rbp: 0,
            },
            &mut read,
        );
    }
}

/// Warms the rules of the code addresses in the top [`MAIN_STACK_SCAN`] bytes of
/// `[stack]` (see [`prewarm`]).
fn warm_main_stack(unwinder: &mut Unwinder, mem: &RemoteMemory, maps: &[MapEntry]) {
    let Some(window) = main_stack_window(maps) else {
        return;
    };
    let Ok(bytes) = mem.read_vec(window.start, (window.end - window.start) as usize) else {
        return;
    };
    let mut warmed = 0;
    for w in bytes.chunks_exact(8) {
        let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
        if warmed < MAIN_STACK_WARM && unwinder.warm_return_address(v) {
            warmed += 1;
        }
    }
}
