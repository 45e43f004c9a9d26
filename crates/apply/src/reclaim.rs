//! Reclaiming retired regions: a removed patch's region is unmapped only once nothing
//! in the process can still point into it.
//!
//! Unpatch restores the jumps and marks the region `Retired` instead of unmapping it:
//! a thread may still hold its data (patched code that tail-called a libc function
//! with a string of the patch is nowhere on the stack while that function runs), and
//! the program may have stored a pointer to new code or data (a callback, a table
//! slot). [`reclaim`] proves a retired region unreferenced with a conservative scan:
//! no register of any thread (general, segment bases, SSE), no 8-byte word of any
//! memory the program can have written (every writable mapping, every anonymous page,
//! every privately modified page of a file mapping, read through `/proc/PID/pagemap`
//! so untouched pages cost nothing) and no epoll registration or POSIX timer value
//! points into the region or the page on either side of it; glibc's mangled pointers
//! (`atexit` handlers, `jmp_buf`s) are demangled with the process's pointer guard and
//! checked too. The scan is made first while the target runs (a region still in use,
//! the usual case just after an unpatch, costs no stop) and then confirmed with every
//! thread stopped, where its result is final: once no thread holds a pointer into a
//! region, none can make one. The confirmation is bounded by what can have changed
//! since the running scan (issue 21: no stop may be longer than the commit's): where
//! the kernel keeps soft-dirty bits, the running scan starts by clearing them
//! (`/proc/PID/clear_refs`) and the stop rescans only the pages written since (soft-
//! dirty), those another process or a `write` to a file can change (not exclusively
//! mapped, file and shared memory pages), the threads' live stacks, their registers
//! and the kernel-held pointers. Without soft-dirty bits
//! the stop must rescan everything, so it is made only when that is at most
//! [`STOP_SCAN_LIMIT`]; otherwise the regions stay retired and a later command tries
//! again. Either stop gives up (threads resumed, regions kept) as soon as it finds
//! more than that to read. Then, the threads running again, the signal handlers
//! (which the kernel holds, with no `/proc` view) are read with `rt_sigaction` through
//! the remote-syscall stub, into a scratch page marked like a region (see
//! [`crate::region::Mark`]). Regions that other retired regions point into are kept as
//! long as those are.
//!
//! Not seen, so not covered: alternate signal stacks, upper halves of AVX registers,
//! and pointers handed to the kernel through `rseq`, `io_uring` or `aio`. A process whose
//! memory to scan exceeds [`SCAN_LIMIT`] keeps its retired regions (the stop would be
//! too long).

use std::collections::BTreeSet;

use livecare_process::arch::x86_64::{SYS_MMAP, SYS_MUNMAP};
use livecare_process::{read_maps, MapEntry, Pid, RemoteMemory, ThreadSet, Tid};

use crate::region::{find_regions_in, RegionHeader, RegionState};
use crate::{Error, Options};

/// Most bytes scanned while the target runs: reading them costs about 1 ms per 4 MiB
/// here (livecare's time, not the target's).
pub const SCAN_LIMIT: u64 = 32 << 20;
/// Most bytes read with every thread stopped: about 250 µs here, on top of about
/// 300 µs of reading the maps, pagemap and descriptors (see the module doc).
pub const STOP_SCAN_LIMIT: u64 = 1 << 20;
/// Most bytes of `/proc/PID/pagemap` read per scan (8 bytes a page: 8 GiB of mappings);
/// a process with larger mappings (huge reservations) keeps its retired regions.
const PAGEMAP_LIMIT: u64 = 16 << 20;
/// Most file descriptors whose fdinfo is read in the stop (epoll registrations).
const FD_LIMIT: usize = 256;
/// Margin around a region: a pointer just past its end (or before its start) counts.
const MARGIN: u64 = 4096;
const PAGE: u64 = 4096;
/// Offset of glibc's pointer guard in the x86_64 thread control block (`%fs:0x30`).
const POINTER_GUARD: u64 = 0x30;

/// What [`reclaim`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reclaimed {
    /// Regions unmapped.
    pub unmapped: Vec<u64>,
    /// Retired regions kept (still referenced, or the scan could not prove otherwise).
    pub kept: Vec<u64>,
}

/// The retired regions to judge: their ranges widened by [`MARGIN`].
struct Targets {
    ranges: Vec<(u64, u64)>,
    lo: u64,
    hi: u64,
    guard: Option<u64>,
}

impl Targets {
    fn new(regions: &[&RegionHeader], guard: Option<u64>) -> Targets {
        let ranges: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| {
                (
                    r.addr.saturating_sub(MARGIN),
                    r.addr + r.total_len.max(PAGE) + MARGIN,
                )
            })
            .collect();
        Targets {
            lo: ranges.iter().map(|r| r.0).min().unwrap_or(0),
            hi: ranges.iter().map(|r| r.1).max().unwrap_or(0),
            ranges,
            guard,
        }
    }

    /// The region `v` points into (`v` is a pointer's value, inclusive of the end).
    fn hit(&self, v: u64) -> Option<usize> {
        if v < self.lo || v > self.hi {
            return None;
        }
        self.ranges.iter().position(|&(a, b)| a <= v && v <= b)
    }

    /// The regions the word `w` points into, plain or as a glibc-mangled pointer.
    fn word(&self, w: u64, out: &mut impl FnMut(usize)) {
        if let Some(i) = self.hit(w) {
            out(i);
        }
        if let Some(g) = self.guard {
            if let Some(i) = self.hit(w.rotate_right(0x11) ^ g) {
                out(i);
            }
        }
    }
}

/// One range of memory to scan, and the retired region it lies in (its own words
/// keep other regions alive only while it is kept).
struct Span {
    addr: u64,
    len: usize,
    inside: Option<usize>,
}

/// Pagemap bits: page present, swapped, file-backed or shared.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// Pagemap bits: page mapped by this process only; written since soft-dirty bits were
/// last cleared (or in a mapping made since).
const PM_EXCLUSIVE: u64 = 1 << 56;
const PM_SOFT_DIRTY: u64 = 1 << 55;

/// Whether this kernel keeps soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`), tried once on
/// a page of livecare's own: cleared, written, then read back from its pagemap.
fn soft_dirty_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        use std::os::unix::fs::FileExt;
        if std::env::var_os("LIVECARE_NO_SOFT_DIRTY").is_some() {
            return false;
        }
        let mut page = vec![0u8; 2 * PAGE as usize];
        let at = (page.as_ptr() as u64 + PAGE - 1) & !(PAGE - 1);
        let off = (at - page.as_ptr() as u64) as usize;
        if std::fs::write("/proc/self/clear_refs", "4").is_err() {
            return false;
        }
        // Volatile: the write must reach the page after the clear.
        // SAFETY: `off` is inside `page`, which we own.
        unsafe { std::ptr::write_volatile(page.as_mut_ptr().add(off), 1) };
        let mut e = [0u8; 8];
        let read = std::fs::File::open("/proc/self/pagemap")
            .and_then(|f| f.read_exact_at(&mut e, at / PAGE * 8));
        std::hint::black_box(&page);
        read.is_ok() && u64::from_le_bytes(e) & PM_SOFT_DIRTY != 0
    })
}

/// The pages the stop rescans when soft-dirty bits are kept: those written since they
/// were cleared, those others can change (see [`Dirty::wanted`]), and the threads' live stacks (from below each stack pointer's red
/// zone to the end of its mapping: a stack pointer that moved down over old words
/// makes them live without writing them).
struct Dirty {
    live: Vec<(u64, u64)>,
}

impl Dirty {
    /// The live stacks of `threads` (stack pointer, `fs_base`) in `maps`.
    fn new(maps: &[MapEntry], threads: &[(u64, Option<u64>)]) -> Dirty {
        let live = threads
            .iter()
            .filter_map(|(sp, _)| {
                let m = maps.iter().find(|m| (m.start..m.end).contains(sp))?;
                Some((
                    sp.saturating_sub(RED_ZONE).max(m.start) & !(PAGE - 1),
                    m.end,
                ))
            })
            .collect();
        Dirty { live }
    }

    /// Whether the page at `at`, with pagemap entry `e`, may hold a pointer the running
    /// scan did not see: written through this process's page tables since the clear,
    /// mapped by another process too, a file or shared memory page (a `write` to the
    /// file, or another process's mapping, changes it with no soft-dirty bit here), or
    /// in a live stack.
    fn wanted(&self, at: u64, e: u64) -> bool {
        e & PM_SOFT_DIRTY != 0
            || e & PM_EXCLUSIVE == 0
            || e & PM_FILE != 0
            || self.live.iter().any(|&(a, b)| (a..b).contains(&at))
    }
}

/// The red zone below a thread's stack pointer, which a leaf function may use.
const RED_ZONE: u64 = 128;
/// glibc's malloc arenas start at multiples of this (`HEAP_MAX_SIZE`).
const ARENA_ALIGN: u64 = 64 << 20;

/// The dead parts of the threads' own stacks: below the lowest stack pointer (and its
/// red zone) in each stack, whole pages only. Stale words there (return addresses,
/// arguments of calls long returned) would keep regions for nothing. A mapping counts
/// as a thread's own stack only when it is `[stack]`, or an anonymous mapping right
/// above a guard page (`---p`), not at a malloc arena's alignment, holding the
/// thread's stack pointer and, when known (`Some`), its thread control block: how
/// glibc lays out a thread's stack. Anything else a stack pointer lies in (a
/// coroutine's stack in a pool, a stack the program carved from the heap) is scanned
/// whole. `threads`: each thread's stack pointer and `fs_base`.
fn dead_stacks(maps: &[MapEntry], threads: &[(u64, Option<u64>)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let guarded = i > 0 && {
            let g = &maps[i - 1];
            g.end == m.start && !g.read && !g.write && !g.exec && g.is_anonymous()
        };
        let own =
            m.path == "[stack]" || (m.is_anonymous() && guarded && m.start % ARENA_ALIGN != 0);
        if !own {
            continue;
        }
        let lowest = threads
            .iter()
            .filter(|(sp, fs)| {
                (m.start..m.end).contains(sp)
                    && (m.path == "[stack]" || fs.is_none_or(|f| (m.start..m.end).contains(&f)))
            })
            .map(|(sp, _)| *sp)
            .min();
        if let Some(sp) = lowest {
            let end = sp.saturating_sub(RED_ZONE) & !(PAGE - 1);
            if end > m.start {
                out.push((m.start, end));
            }
        }
    }
    out
}

/// The stack pointers of the threads of `pid` blocked now, from
/// `/proc/PID/task/TID/syscall` (a running thread has none to give), for the scan made
/// while the target runs (which only decides whether a stop is worth making).
fn blocked_stack_pointers(pid: Pid) -> Vec<(u64, Option<u64>)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", pid.0)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in dir.flatten() {
        let Ok(line) = std::fs::read_to_string(t.path().join("syscall")) else {
            continue;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[0] != "running" {
            if let Ok(sp) = u64::from_str_radix(f[f.len() - 2].trim_start_matches("0x"), 16) {
                out.push((sp, None));
            }
        }
    }
    out
}

/// Where to read `/proc` files of the process's memory and descriptors: `/proc/PID`,
/// or a live thread's `/proc/PID/task/TID` once the main thread has exited (a zombie
/// main thread has no memory or descriptors to show).
fn proc_dir(pid: Pid) -> String {
    let main = format!("/proc/{}", pid.0);
    let zombie = |dir: &str| {
        std::fs::read_to_string(format!("{dir}/stat"))
            .ok()
            .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with(['Z', 'X'])))
            .unwrap_or(true)
    };
    if !zombie(&main) {
        return main;
    }
    std::fs::read_dir(format!("{main}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("{main}/task/{}", e.file_name().to_string_lossy()))
        .find(|t| !zombie(t))
        .unwrap_or(main)
}

/// The memory a pointer into a region can be in now, but for `dead` (see
/// [`dead_stacks`]), and only what `dirty` wants when given; `None` when some cannot
/// be read (a present page the program made unreadable) or there is more than `limit`
/// bytes of it.
fn spans(
    dir: &str,
    maps: &[MapEntry],
    regions: &[&RegionHeader],
    dead: &[(u64, u64)],
    dirty: Option<&Dirty>,
    limit: u64,
) -> Option<Vec<Span>> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open(format!("{dir}/pagemap")).ok()?;
    let mut out = Vec::new();
    let (mut total, mut pm_total) = (0u64, 0u64);
    for m in maps {
        // The kernel's own pages (vdso, vvar, vsyscall) hold no pointer of the program.
        if m.path.starts_with('[')
            && !matches!(m.path.as_str(), "[heap]" | "[stack]")
            && !m.path.starts_with("[anon:")
            && !m.path.starts_with("[stack:")
        {
            continue;
        }
        let pages = ((m.end - m.start) / PAGE) as usize;
        pm_total += pages as u64 * 8;
        if pm_total > PAGEMAP_LIMIT {
            tracing::debug!(
                pm_total,
                "mappings too large to scan for reclaiming regions"
            );
            return None;
        }
        let mut pm = vec![0u8; pages * 8];
        pagemap.read_exact_at(&mut pm, m.start / PAGE * 8).ok()?;
        let anon = m.inode == 0;
        let inside = regions
            .iter()
            .position(|r| r.addr <= m.start && m.end <= r.addr + r.total_len);
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: &mut Option<(u64, u64)>, out: &mut Vec<Span>| {
            if let Some((a, b)) = run.take() {
                out.push(Span {
                    addr: a,
                    len: (b - a) as usize,
                    inside,
                });
            }
        };
        for (i, e) in pm.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let at = m.start + i as u64 * PAGE;
            // A page never touched holds zeros or the file's bytes; a file page of a
            // mapping the program cannot write holds what the file holds.
            let wanted = e & (PM_PRESENT | PM_SWAPPED) != 0
                && (m.write || anon || e & PM_FILE == 0)
                && !dead.iter().any(|&(a, b)| (a..b).contains(&at))
                && dirty.is_none_or(|d| d.wanted(at, e));
            if !wanted {
                flush(&mut run, &mut out);
                continue;
            }
            if !m.read {
                return None;
            }
            total += PAGE;
            match &mut run {
                Some((_, b)) if *b == at => *b += PAGE,
                _ => {
                    flush(&mut run, &mut out);
                    run = Some((at, at + PAGE));
                }
            }
        }
        flush(&mut run, &mut out);
        if total > limit {
            tracing::debug!(
                total,
                limit,
                "too much memory to scan for reclaiming regions"
            );
            return None;
        }
    }
    Some(out)
}

/// References found: `(from, to)` where `from` is the retired region the word lies in
/// (`None`: anywhere else, a register or the kernel).
type Refs = BTreeSet<(Option<usize>, usize)>;

/// Scans `spans` (reading them in one batch); false if one could not be read.
fn scan_memory(mem: &RemoteMemory, t: &Targets, spans: &[Span], refs: &mut Refs) -> bool {
    let ranges: Vec<(u64, usize)> = spans.iter().map(|s| (s.addr, s.len)).collect();
    for (s, bytes) in spans.iter().zip(mem.read_ranges(&ranges)) {
        let Some(bytes) = bytes else {
            return false;
        };
        for (k, c) in bytes.chunks_exact(8).enumerate() {
            t.word(
                u64::from_le_bytes(c.try_into().unwrap_or_default()),
                &mut |i| {
                    if s.inside != Some(i) && refs.insert((s.inside, i)) {
                        let at = s.addr + 8 * k as u64;
                        tracing::debug!("a word at {at:#x} points into retired region {i}");
                    }
                },
            );
        }
    }
    true
}

/// Epoll registrations' data and POSIX timers' values: pointers the kernel holds.
/// False when they could not all be read.
fn scan_kernel(pid: Pid, dir: &str, t: &Targets, refs: &mut Refs) -> bool {
    let mut words = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("{dir}/fd")) else {
        return false;
    };
    let fds: Vec<_> = fds.flatten().collect();
    if fds.len() > FD_LIMIT {
        return false;
    }
    for fd in fds {
        // Only epoll descriptors hold registrations: one readlink each, against an
        // open, two reads and a close for its fdinfo (the stop's syscalls are slow).
        // An fd closed meanwhile holds nothing.
        if !std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]") {
            continue;
        }
        let info = format!("{dir}/fdinfo/{}", fd.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(info) else {
            continue;
        };
        for l in text.lines().filter(|l| l.starts_with("tfd:")) {
            if let Some(v) = l.split_whitespace().skip_while(|w| *w != "data:").nth(1) {
                words.extend(u64::from_str_radix(v, 16).ok());
            }
        }
    }
    // `signal: N/<sigev_value>`, one line per timer (no file: no timers support).
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{}/timers", pid.0)) {
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("signal: ").and_then(|v| v.split('/').nth(1)) {
                words.extend(u64::from_str_radix(v.trim(), 16).ok());
            }
        }
    }
    for w in words {
        t.word(w, &mut |i| {
            refs.insert((None, i));
        });
    }
    true
}

/// Every register of stopped thread `tid`: general-purpose (with the segment bases)
/// and the SSE registers. False when they could not be read.
fn scan_registers(threads: &ThreadSet, tid: Tid, t: &Targets, refs: &mut Refs) -> bool {
    let Ok(r) = threads.regs(tid) else {
        return false;
    };
    let mut add = |i| {
        if refs.insert((None, i)) {
            tracing::debug!(tid = tid.0, "a register points into retired region {i}");
        }
    };
    for v in [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.rsp, r.fs_base, r.gs_base,
    ] {
        t.word(v, &mut add);
    }
    // SAFETY: user_fpregs_struct is plain data; zero is a valid value.
    let mut fp: libc::user_fpregs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: tid is a thread we trace and hold stopped; GETFPREGS fills the struct
    // whose address we pass, and nothing else.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETFPREGS,
            tid.0,
            std::ptr::null_mut::<libc::c_void>(),
            &mut fp as *mut libc::user_fpregs_struct,
        )
    };
    if rc < 0 {
        return false;
    }
    for pair in fp.xmm_space.chunks_exact(2) {
        t.word((pair[1] as u64) << 32 | pair[0] as u64, &mut add);
    }
    true
}

/// The regions to keep: those referenced from outside any retired region, and those
/// referenced from a kept one.
fn kept(n: usize, refs: &Refs) -> Vec<bool> {
    let mut keep = vec![false; n];
    for (from, to) in refs {
        if from.is_none() {
            keep[*to] = true;
        }
    }
    loop {
        let more: Vec<usize> = refs
            .iter()
            .filter_map(|(f, t)| f.filter(|f| keep[*f] && !keep[*t]).map(|_| *t))
            .collect();
        if more.is_empty() {
            return keep;
        }
        for t in more {
            keep[t] = true;
        }
    }
}

/// `rt_sigaction`'s number, and the size of the kernel's `struct sigaction` with an
/// 8-byte signal set (handler, flags, restorer, mask).
const SYS_RT_SIGACTION: u64 = 13;
const SIGACTION_LEN: u64 = 32;
/// Signals 1 to 64.
const NSIG: u64 = 64;

/// A free page for scratch use, with a free page on either side (so the mapping never
/// merges with a neighbour), from `maps` (sorted, as the kernel lists them).
fn free_page(maps: &[MapEntry]) -> Option<u64> {
    let mut prev_end = 0x10_0000u64;
    for m in maps {
        if m.start >= prev_end + 3 * PAGE {
            return Some(prev_end + PAGE);
        }
        prev_end = prev_end.max(m.end);
    }
    None
}

/// The handlers and restorers of every signal, read with `rt_sigaction` in one borrow
/// of one thread (the threads run). False when they could not be read.
fn scan_handlers(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    t: &Targets,
    refs: &mut Refs,
) -> bool {
    let pid = threads.pid();
    // Only signals the process catches have a handler (the others' are SIG_DFL or
    // SIG_IGN): most processes catch few or none, and each is one more syscall of the
    // borrowed thread, which is held meanwhile.
    let Some(caught) = caught_signals(pid) else {
        return false;
    };
    if caught == 0 {
        return true;
    }
    let Ok(maps) = read_maps(pid) else {
        return false;
    };
    let Some(page) = free_page(&maps) else {
        return false;
    };
    let Ok(stub) = crate::rsyscall::Stub::find(threads, mem, &maps) else {
        return false;
    };
    // Marked first: a livecare killed before the munmap leaves a page `repair` removes.
    let Some(mark) = crate::region::Mark::place(mem, &maps, stub.site(), page, PAGE) else {
        return false;
    };
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let mut calls: Vec<crate::rsyscall::Call> =
        vec![("mmap", SYS_MMAP, [page, PAGE, rw, flags, u64::MAX, 0])];
    let sigs: Vec<u64> = (1..=NSIG).filter(|s| caught & 1 << (s - 1) != 0).collect();
    for (i, sig) in sigs.iter().enumerate() {
        let at = page + i as u64 * SIGACTION_LEN;
        calls.push(("rt_sigaction", SYS_RT_SIGACTION, [*sig, 0, at, 8, 0, 0]));
    }
    let n = sigs.len();
    calls.push(("munmap", SYS_MUNMAP, [page, PAGE, 0, 0, 0, 0]));
    let read = std::cell::RefCell::new(None);
    let (results, ran) = stub.syscalls(threads, mem, &calls, &|i, v| {
        if i == n {
            // Every answer is in: read them before the page goes.
            *read.borrow_mut() = mem.read_vec(page, n * SIGACTION_LEN as usize).ok();
        }
        i != 0 || v == page
    });
    // Where the page was mapped (a kernel without MAP_FIXED_NOREPLACE may put it
    // elsewhere: the sequence then stops at once).
    let mapped = match results.first() {
        Some(Ok(at)) => Some(*at),
        _ => None,
    };
    let mut unmapped = results.len() == calls.len() && results.last().is_some_and(|r| r.is_ok());
    if let (Some(at), false) = (mapped, unmapped) {
        // The sequence stopped half way: the page goes on its own.
        let munmap = [at, PAGE, 0, 0, 0, 0];
        unmapped = stub
            .syscall(threads, mem, "munmap", SYS_MUNMAP, munmap)
            .is_ok();
    }
    if unmapped || mapped.is_none() {
        let _ = mark.clear(mem);
    }
    // Every rt_sigaction must have answered; any failure leaves the regions kept.
    if ran.is_err() || results.len() != calls.len() || results[1..=n].iter().any(|r| r.is_err()) {
        return false;
    }
    let Some(bytes) = read.into_inner() else {
        return false;
    };
    for sa in bytes.chunks_exact(SIGACTION_LEN as usize) {
        for w in [&sa[0..8], &sa[16..24]] {
            t.word(
                u64::from_le_bytes(w.try_into().unwrap_or_default()),
                &mut |i| {
                    refs.insert((None, i));
                },
            );
        }
    }
    true
}

/// The signals `pid` catches (`SigCgt` of its status: bit `n - 1` for signal `n`),
/// from a live thread (a zombie main thread shows none).
fn caught_signals(pid: Pid) -> Option<u64> {
    let text = std::fs::read_to_string(format!("{}/status", proc_dir(pid))).ok()?;
    let mask = text.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
    u64::from_str_radix(mask.trim(), 16).ok()
}

/// glibc's pointer guard (the same in every thread), read from the thread control
/// block at `fs_base`.
fn pointer_guard(mem: &RemoteMemory, fs_base: u64) -> Option<u64> {
    (fs_base != 0)
        .then(|| mem.read_u64(fs_base + POINTER_GUARD).ok())
        .flatten()
}

/// Retired regions an unpatch lets pile up before it tries to reclaim them: the
/// reclaim's scans (and, without soft-dirty bits, its stop's full rescan) are paid once
/// for several regions. A region is a few pages; `info` lists them.
pub const RECLAIM_AT: usize = 3;

/// Unmaps every retired region of `pid` proven unreferenced (see the module doc);
/// keeps the others. Seizes the process for the final scan's stop and the munmap.
pub fn reclaim(pid: Pid, opts: &Options) -> Result<Reclaimed, Error> {
    reclaim_from(pid, opts, 1)
}

/// [`reclaim`] once at least `at_least` regions are retired; before that they are
/// all kept, and nothing is scanned.
pub(crate) fn reclaim_from(pid: Pid, opts: &Options, at_least: usize) -> Result<Reclaimed, Error> {
    let mem = RemoteMemory::open(pid)?;
    let maps = read_maps(pid)?;
    let all = find_regions_in(&mem, &maps);
    let retired: Vec<&RegionHeader> = all
        .iter()
        .filter(|r| r.state == RegionState::Retired)
        .collect();
    let mut out = Reclaimed::default();
    if retired.len() < at_least.max(1) {
        out.kept = retired.iter().map(|r| r.addr).collect();
        return Ok(out);
    }
    let keep_all = |out: &mut Reclaimed| {
        out.kept = retired.iter().map(|r| r.addr).collect();
    };
    let dir = proc_dir(pid);
    // Before the running scan reads anything: every page written from now on is
    // soft-dirty, and the stop rescans only those.
    let dirty = soft_dirty_supported() && std::fs::write(format!("{dir}/clear_refs"), "4").is_ok();
    // While the target runs: a region still referenced is kept without a stop (the
    // pointer guard needs a thread's registers: mangled pointers are seen in the stop).
    let t0 = Targets::new(&retired, None);
    let running = std::time::Instant::now();
    let mut refs = Refs::new();
    let dead = dead_stacks(&maps, &blocked_stack_pointers(pid));
    let Some(sp) = spans(&dir, &maps, &retired, &dead, None, SCAN_LIMIT) else {
        keep_all(&mut out);
        return Ok(out);
    };
    if !scan_memory(&mem, &t0, &sp, &mut refs) || !scan_kernel(pid, &dir, &t0, &mut refs) {
        keep_all(&mut out);
        return Ok(out);
    }
    if kept(retired.len(), &refs).iter().all(|k| *k) {
        keep_all(&mut out);
        tracing::debug!(n = retired.len(), "retired regions still referenced");
        return Ok(out);
    }
    let bytes: u64 = sp.iter().map(|s| s.len as u64).sum();
    tracing::debug!(
        bytes,
        us = running.elapsed().as_micros() as u64,
        "reclaim: running scan"
    );
    if !dirty && bytes > STOP_SCAN_LIMIT {
        // The stop would rescan it all: longer than the commit's. Kept for a later
        // command (whose process may be smaller then, or whose kernel tracks writes).
        keep_all(&mut out);
        tracing::debug!(
            bytes,
            limit = STOP_SCAN_LIMIT,
            "no soft-dirty bits: retired regions kept rather than rescanning {bytes} bytes in a stop"
        );
        return Ok(out);
    }
    // The final scan, every thread stopped.
    let mut threads = crate::seize(pid, opts, false, "reclaim")?;
    threads.interrupt_all()?;
    let started = std::time::Instant::now();
    let verdict = (|| -> Option<Refs> {
        let tids = threads.tids();
        let fs_base = tids.first().and_then(|t| threads.regs(*t).ok())?.fs_base;
        let t = Targets::new(&retired, pointer_guard(&mem, fs_base));
        let mut refs = Refs::new();
        let mut stacks = Vec::new();
        for tid in tids {
            if !scan_registers(&threads, tid, &t, &mut refs) {
                return None;
            }
            let r = threads.regs(tid).ok()?;
            stacks.push((r.rsp, Some(r.fs_base)));
        }
        let us = |t: std::time::Instant| t.elapsed().as_micros() as u64;
        let regs_us = us(started);
        let at = std::time::Instant::now();
        let maps = read_maps(pid).ok()?;
        let maps_us = us(at);
        let at = std::time::Instant::now();
        let since = dirty.then(|| Dirty::new(&maps, &stacks));
        let dead = dead_stacks(&maps, &stacks);
        let sp = spans(
            &dir,
            &maps,
            &retired,
            &dead,
            since.as_ref(),
            STOP_SCAN_LIMIT,
        )?;
        let pagemap_us = us(at);
        let at = std::time::Instant::now();
        if !scan_memory(&mem, &t, &sp, &mut refs) {
            return None;
        }
        let memory_us = us(at);
        let at = std::time::Instant::now();
        if !scan_kernel(pid, &dir, &t, &mut refs) {
            return None;
        }
        tracing::debug!(
            bytes = sp.iter().map(|s| s.len).sum::<usize>(),
            soft_dirty = dirty,
            regs_us,
            maps_us,
            pagemap_us,
            memory_us,
            kernel_us = us(at),
            "reclaim: final scan"
        );
        Some(refs)
    })();
    threads.resume_all()?;
    tracing::debug!(
        us = started.elapsed().as_micros() as u64,
        "reclaim: stop over"
    );
    let Some(mut refs) = verdict else {
        keep_all(&mut out);
        threads.detach_all()?;
        return Ok(out);
    };
    // The handlers last: one installed before the stop is there now, and none can be
    // installed since (no pointer exists to install).
    if kept(retired.len(), &refs).iter().any(|k| !k) {
        let t = Targets::new(&retired, None);
        let at = std::time::Instant::now();
        let ok = scan_handlers(&mut threads, &mem, &t, &mut refs);
        tracing::debug!(
            us = at.elapsed().as_micros() as u64,
            ok,
            "reclaim: signal handlers read"
        );
        if !ok {
            keep_all(&mut out);
            threads.detach_all()?;
            return Ok(out);
        }
    }
    let keep = kept(retired.len(), &refs);
    // Nothing points into the others, and nothing can come to (a pointer cannot be
    // made from none): unmapped with the threads running again.
    let (gone, stay): (Vec<_>, Vec<_>) = retired.iter().zip(keep).partition(|(_, k)| !k);
    out.kept.extend(stay.iter().map(|(r, _)| r.addr));
    let calls: Vec<crate::rsyscall::Call> = gone
        .iter()
        .map(|(r, _)| ("munmap", SYS_MUNMAP, [r.addr, r.total_len, 0, 0, 0, 0]))
        .collect();
    // All in one borrow of one thread: one stop of it, not one per region.
    let results = match read_maps(pid)
        .map_err(Error::from)
        .and_then(|maps| crate::rsyscall::Stub::find(&threads, &mem, &maps))
    {
        Ok(stub) if !calls.is_empty() => stub.syscalls(&mut threads, &mem, &calls, &|_, _| true).0,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::debug!("reclaim: no stub for the munmaps: {e}");
            Vec::new()
        }
    };
    for (i, (r, _)) in gone.iter().enumerate() {
        match results.get(i) {
            Some(Ok(_)) => out.unmapped.push(r.addr),
            Some(Err(e)) => {
                tracing::debug!(region = r.addr, "reclaim munmap failed: {e}");
                out.kept.push(r.addr);
            }
            None => out.kept.push(r.addr),
        }
    }
    threads.detach_all()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, perms: &str, path: &str) -> MapEntry {
        let b = perms.as_bytes();
        MapEntry {
            start,
            end,
            read: b[0] == b'r',
            write: b[1] == b'w',
            exec: b[2] == b'x',
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            path: path.into(),
        }
    }

    #[test]
    fn only_a_threads_own_stack_below_its_stack_pointer_is_dead() {
        let maps = vec![
            map(0x7000_0000, 0x7000_1000, "---p", ""),
            // A glibc thread stack: guard below, TCB at the top.
            map(0x7000_1000, 0x7080_1000, "rw-p", ""),
            // A pool of coroutine stacks: no guard right below.
            map(0x7100_0000, 0x7200_0000, "rw-p", ""),
            map(0x7ff0_0000, 0x7ff2_1000, "rw-p", "[stack]"),
        ];
        let threads = [
            (0x7070_0123, Some(0x7080_0700)),
            (0x7180_0000, Some(0x7080_0700)),
            (0x7ff1_0010, Some(0x1234)),
        ];
        assert_eq!(
            dead_stacks(&maps, &threads),
            vec![(0x7000_1000, 0x7070_0000), (0x7ff0_0000, 0x7ff0_f000)]
        );
        // A stack pointer whose thread control block lies elsewhere: not its stack.
        let elsewhere = [(0x7070_0123, Some(0x9999_0000))];
        assert!(dead_stacks(&maps, &elsewhere).is_empty());
    }

    #[test]
    fn the_stop_rescans_written_shared_and_live_stack_pages_only() {
        let maps = vec![
            map(0x5000_0000, 0x5001_0000, "rw-p", "[heap]"),
            map(0x7ff0_0000, 0x7ff2_1000, "rw-p", "[stack]"),
        ];
        let d = Dirty::new(&maps, &[(0x7ff1_0010, None)]);
        // From below the red zone (a page lower) to the end of the stack.
        assert_eq!(d.live, vec![(0x7ff0_f000, 0x7ff2_1000)]);
        let clean = PM_PRESENT | PM_EXCLUSIVE;
        assert!(!d.wanted(0x5000_0000, clean));
        assert!(d.wanted(0x5000_0000, clean | PM_SOFT_DIRTY));
        assert!(d.wanted(0x5000_0000, PM_PRESENT));
        assert!(d.wanted(0x5000_0000, clean | PM_FILE));
        assert!(d.wanted(0x7ff0_f000, clean));
        assert!(!d.wanted(0x7ff0_e000, clean));
    }

    #[test]
    fn a_region_referenced_only_from_a_region_kept_is_kept_too() {
        // 0 is referenced from outside; 1 from 0; 2 only from itself-free region 3,
        // which nothing references.
        let refs: Refs = [(None, 0), (Some(0), 1), (Some(3), 2)]
            .into_iter()
            .collect();
        assert_eq!(kept(4, &refs), vec![true, true, false, false]);
    }

    #[test]
    fn mangled_pointers_and_pointers_just_past_the_end_are_found() {
        let r = RegionHeader {
            addr: 0x7000_0000,
            total_len: 0x3000,
            seq: 1,
            build_id: String::new(),
            patch_id: String::new(),
            hash: 0,
            level: 0,
            eh_frame: 0,
            eh_frame_len: 0,
            load_bias: 0,
            exec_len: 0x1000,
            state: RegionState::Retired,
            hunks: Vec::new(),
        };
        let guard = 0x1234_5678_9abc_def0;
        let t = Targets::new(&[&r], Some(guard));
        let mangle = |p: u64| (p ^ guard).rotate_left(0x11);
        let mut hits = Vec::new();
        for w in [
            0x7000_1234,
            0x7000_3000,
            mangle(0x7000_0010),
            0x6000_0000,
            0,
        ] {
            let mut n = 0;
            t.word(w, &mut |_| n += 1);
            hits.push(n);
        }
        assert_eq!(hits, vec![1, 1, 1, 0, 0]);
    }
}
