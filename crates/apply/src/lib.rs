//! The doctor: apply, unpatch and inspect live patches in a running process.
//!
//! You give it a pid and patches (see [`load_patches`]); it finds the object with the
//! patch's build-id, and does everything else. Work is split in two phases so the
//! target is paused only briefly: **prepare** (parse, resolve symbols, map a region
//! within ±2 GiB with one remote `mmap`, relocate, write the body and the undo data)
//! runs while the target runs; **commit** stops every thread at once, checks that no
//! thread is inside a function being replaced, writes the 5-byte jumps and resumes.
//! A busy thread is run alone until the return of its outermost busy frame, caught by
//! a trampoline its return address is redirected to (others stay stopped, bounded to
//! 200 ms), otherwise every thread is resumed and the commit retried with backoff
//! until the timeout.
//! All state lives in the target (a header at the start of each region), so `info` and
//! `unpatch` need nothing on the host. Every failure before the jumps leaves nothing
//! behind but an unmapped region, and every thread is detached on every path. Unpatch
//! restores the code but keeps the region mapped, retired, until [`reclaim`] proves
//! nothing in the process points into it any more.
//!
//! Crash consistency: livecare may be killed at any instant without harming the
//! target. Nothing it leaves behind can trap (no breakpoints; the return trampoline
//! and the remote-syscall stub finish on their own), the header's state word is a
//! journal written before the first and after the last code write of a commit, and
//! [`repair`] completes or rolls back whatever a dead livecare left half done.
//! Several patches (or removals) in one call are all or nothing.

pub mod arch;
mod bare;
mod callsites;
mod commit;
mod container;
mod error;
pub mod fault;
mod ifunc;
mod lock;
mod prepare;
mod reclaim;
mod region;
mod repair;
mod rsyscall;
mod safety;
mod trampoline;
mod trust;
mod unpatch;
pub mod unwind;

use std::time::{Duration, Instant};

use livecare_process::arch::x86_64::{SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP};
use livecare_process::{
    loaded_objects, read_maps, LoadedObject, MapEntry, Pid, RemoteMemory, ThreadSet,
};

use commit::fill_and_commit;
pub use container::{
    fnv1a, load_patches, load_patches_by, parse_container, read_patch_bytes, read_patch_file,
    DirLookup, Loaded, Patch,
};
pub use error::Error;
pub use lock::{start_time, TargetLock};
use prepare::{ObjectView, PatchElf};
pub use reclaim::{reclaim, Reclaimed};
pub use region::{
    find_regions, leftovers, CallSite, Hunk, Leftover, Mark, RegionHeader, RegionState,
};
pub use repair::{check as check_regions, repair, RegionCheck, RepairReport, Repaired, Verdict};
pub use trust::check_trusted;
use unpatch::unpatch_regions;
pub use unpatch::{unpatch, UnpatchReport, UnpatchSelect};

/// Knobs of apply and unpatch.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long to wait for threads to leave the functions being replaced.
    pub timeout: Duration,
    /// Keep every thread stopped after the commit (for `run`, which patches a
    /// program stopped at its entry point and lets it go only at the end).
    pub hold: bool,
    /// Where idle CPUs cannot be made to poll during the pauses, keep a
    /// single-threaded target's CPU busy with a spinner thread instead
    /// ([`ThreadSet::keep_cpus_warm`]): for one process at a time, not parallel jobs.
    pub spin_cpus: bool,
    /// Leave threads that stayed blocked in a syscall while the patch was prepared
    /// inside it, fenced, instead of stopping them in the commit
    /// ([`ThreadSet::fence_idle`]). [`apply`] and [`unpatch`] then trace a
    /// multi-threaded process from a thread of their own, whose exit releases the
    /// threads still fenced without waking them.
    pub fence_idle: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Duration::from_secs(3),
            hold: false,
            spin_cpus: false,
            fence_idle: false,
        }
    }
}

/// What one applied patch did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    /// Process.
    pub pid: i32,
    /// Process name.
    pub comm: String,
    /// Patched object's path.
    pub object: String,
    /// Its build-id.
    pub build_id: String,
    /// Patch id.
    pub patch_id: String,
    /// Region address.
    pub region: u64,
    /// Replaced functions.
    pub hunks: Vec<Hunk>,
    /// Length of the stop in which the jumps were written, in µs.
    pub pause_us: u64,
    /// That stop's first INTERRUPT and last resume, `CLOCK_MONOTONIC` ns.
    pub pause_window_ns: [u64; 2],
    /// Commit attempts (1 = safe at first try).
    pub attempts: u32,
    /// Threads left fenced in their syscall during that stop, not stopped.
    pub threads_fenced: usize,
}

/// One object of a process with the patches applied to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectInfo {
    /// Path.
    pub path: String,
    /// Build-id.
    pub build_id: String,
    /// Applied patches, oldest first.
    pub patches: Vec<RegionHeader>,
}

/// `info` for one process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessInfo {
    /// Process.
    pub pid: i32,
    /// Name.
    pub comm: String,
    /// Objects with build-ids (patched ones carry their patches).
    pub objects: Vec<ObjectInfo>,
    /// Regions not cleanly applied: interrupted commits or removals, and leftovers
    /// (see `repair`). Empty when every patch is fully in or fully out.
    pub incomplete: Vec<RegionCheck>,
    /// Removed patches whose regions stay mapped, inactive, because the process may
    /// still use them (see [`RegionState::Retired`]); oldest first.
    pub retired: Vec<RegionHeader>,
    /// What interrupted livecares left outside any region header (see `repair`).
    pub leftovers: Vec<Leftover>,
}

/// Reads the patch state of `pid` (no ptrace needed, only /proc access).
pub fn info(pid: Pid) -> Result<ProcessInfo, Error> {
    check_pid(pid)?;
    let objects = loaded_objects(pid)?;
    let regions = find_regions(pid)?;
    let mut out = ProcessInfo {
        pid: pid.0,
        comm: pid.comm(),
        objects: Vec::new(),
        incomplete: repair::check(pid, false)?,
        retired: regions
            .iter()
            .filter(|r| r.state == RegionState::Retired)
            .cloned()
            .collect(),
        leftovers: leftovers(pid)?,
    };
    for o in objects {
        let Some(bid) = o.build_id.clone() else {
            continue;
        };
        let patches = regions
            .iter()
            .filter(|r| r.build_id == bid && r.state == RegionState::Applied)
            .cloned()
            .collect();
        out.objects.push(ObjectInfo {
            path: o.path,
            build_id: bid,
            patches,
        });
    }
    Ok(out)
}

/// Patching on top of an interrupted operation would build on code of unknown state:
/// refuse, naming the way out (`regions`: all of the process's, as found).
fn refuse_if_interrupted_in(pid: Pid, regions: &[RegionHeader]) -> Result<(), Error> {
    let bad: Vec<String> = regions
        .iter()
        .filter(|r| r.state.is_incomplete())
        .map(|r| format!("patch {} ({:?})", r.patch_id, r.state).to_lowercase())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(Error::Unpatch(format!(
        "pid {pid} has an operation interrupted mid-way ({}); run `livecare repair -p {pid}` first",
        bad.join(", ")
    )))
}

/// A process we can work on: it exists and is not a kernel thread.
fn check_pid(pid: Pid) -> Result<(), Error> {
    if pid.0 <= 0 || !std::path::Path::new(&format!("/proc/{}/maps", pid.0)).exists() {
        return Err(livecare_process::Error::NoSuchProcess(pid).into());
    }
    if pid.is_kernel_thread() {
        return Err(livecare_process::Error::KernelThread(pid).into());
    }
    Ok(())
}

fn hole_near(maps: &[MapEntry], obj: &LoadedObject, size: u64) -> Option<u64> {
    const GAP: u64 = 0x1000; // keeps regions from merging with neighbours in /proc/PID/maps
    const RANGE: u64 = 0x7fff_0000;
    let mut spans: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    spans.sort();
    let lo_limit = obj.end().saturating_sub(RANGE).max(0x10000);
    let hi_limit = obj.start().saturating_add(RANGE).min(0x7fff_ffff_f000);
    let free = |a: u64| -> bool {
        a >= lo_limit
            && a + size <= hi_limit
            && spans
                .iter()
                .all(|&(s, e)| a + size + GAP <= s || a >= e + GAP)
    };
    // After the object's last mapping, then after every later mapping, then before.
    let mut cands = vec![obj.end() + GAP];
    cands.extend(spans.iter().filter(|s| s.1 >= obj.end()).map(|s| s.1 + GAP));
    cands.extend(
        spans
            .iter()
            .rev()
            .filter(|s| s.0 <= obj.start())
            .map(|s| s.0.saturating_sub(size + GAP) & !0xfff),
    );
    cands.into_iter().find(|&a| free(a))
}

/// Parses every loaded object we can, for symbol lookup.
fn views(objects: &[LoadedObject]) -> Vec<(LoadedObject, ObjectView)> {
    objects
        .iter()
        .filter_map(|o| ObjectView::new(o).ok().map(|v| (o.clone(), v)))
        .collect()
}

const PROT_RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;
const PROT_RX: u64 = (libc::PROT_READ | libc::PROT_EXEC) as u64;

/// Applies every patch whose build-id matches a loaded object of `pid`. Patches with
/// no matching object are skipped; if none matches, that is an error. If one patch
/// fails, those applied before it in this call are removed again.
pub fn apply(pid: Pid, patches: &[Patch], opts: &Options) -> Result<Vec<ApplyReport>, Error> {
    // A dead pid or a kernel thread is named as such, before /proc is read for objects.
    check_pid(pid)?;
    apply_to_objects(pid, patches, loaded_objects(pid)?, opts)
}

/// Like [`apply`], with the process's loaded objects already read by the caller
/// (`-p all` reads them once to pick the processes; reading every object file again
/// per step would dominate the per-process cost). A process that died since, or a
/// kernel thread (which maps no objects), fails when its threads are seized.
pub fn apply_to_objects(
    pid: Pid,
    patches: &[Patch],
    objects: Vec<LoadedObject>,
    opts: &Options,
) -> Result<Vec<ApplyReport>, Error> {
    if matching_patches(patches, &objects).is_empty() {
        let loaded = objects
            .iter()
            .filter_map(|o| o.build_id.as_ref().map(|b| format!("{} {}", o.name(), b)))
            .collect::<Vec<_>>()
            .join(", ");
        let wanted = patches
            .iter()
            .map(|p| p.build_id.clone())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::NoMatchingObject {
            pid: pid.0,
            build_id: wanted,
            loaded,
        });
    }
    // Held until we return: no other livecare works on this process meanwhile.
    let _lock = TargetLock::acquire(pid)?;
    let res = on_tracer_thread(pid, opts, |fence| {
        let mut threads = seize(pid, opts, fence, "patch")?;
        let done = apply_with_objects(&mut threads, patches, &objects, opts)?;
        fault::point("before-detach");
        threads.detach_all()?;
        Ok(done)
    });
    if res.is_err() {
        // Patches rolled back in this call are retired: unmapped now if nothing
        // points into them, so a failed patch leaves nothing behind if it can.
        reclaim_quietly(pid, opts, 1);
    }
    res
}

/// [`reclaim`] once at least `at_least` regions are retired, whose failure only means
/// the retired regions stay (they are listed by `info`): it never fails the command
/// that made them.
fn reclaim_quietly(pid: Pid, opts: &Options, at_least: usize) -> Reclaimed {
    if opts.hold {
        return Reclaimed::default();
    }
    reclaim::reclaim_from(pid, opts, at_least).unwrap_or_else(|e| {
        tracing::debug!("reclaiming retired regions: {e}");
        Reclaimed::default()
    })
}

/// Fewest threads a process has for its idle ones to be fenced: a lone thread gains
/// little (its one stop is short) and would need a tracer thread of its own.
const FENCE_MIN_THREADS: usize = 2;

/// Waits, up to `timeout` since `start`, until no other process shares `pid`'s memory
/// (see [`Pid::memory_sharers`]): such a process runs the target's code outside any
/// stop, so it could be inside a function being replaced, or in code about to be
/// unmapped. A `vfork` child is usually gone within milliseconds (it calls `exec`), and
/// until then its parent thread is blocked where no ptrace stop reaches it.
fn wait_for_memory_sharers(
    threads: &ThreadSet,
    action: &'static str,
    start: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let pid = threads.pid();
    let mut nap = Duration::from_millis(1);
    loop {
        let Some(child) = pid.memory_sharers(&threads.tids()).first().copied() else {
            return Ok(());
        };
        if start.elapsed() >= timeout {
            return Err(Error::SharedMemory {
                action,
                pid: pid.0,
                child: child.0,
                secs: start.elapsed().as_secs_f64(),
            });
        }
        tracing::debug!(
            child = child.0,
            "waiting for a process that shares the memory"
        );
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// Seizes every thread of `pid` as `opts` say; idle threads will be fenced if `fence`.
/// Then waits until no other process shares its memory ([`wait_for_memory_sharers`]).
fn seize(pid: Pid, opts: &Options, fence: bool, action: &'static str) -> Result<ThreadSet, Error> {
    ThreadSet::refuse_stopped(pid)?;
    let mut threads = ThreadSet::seize(pid).map_err(|e| lock::explain_seize(pid, e))?;
    threads.watch.label = action;
    wait_for_memory_sharers(&threads, action, Instant::now(), opts.timeout)?;
    threads.keep_cpus_warm(opts.spin_cpus);
    if fence {
        // Threads that run at all until the commit are stopped there as usual.
        threads.note_idle();
    }
    Ok(threads)
}

/// Runs `f`, which traces `pid`, on a thread of its own when threads may be fenced
/// (`f` is told whether to fence): when that thread exits, the kernel detaches the
/// threads left fenced in their syscall without waking them (`PTRACE_DETACH` needs a
/// stopped tracee). Otherwise a fenced thread whose syscall returns would wait at its
/// exit stop for as long as the caller's thread lives (the next process of `-p all`).
fn on_tracer_thread<T: Send>(
    pid: Pid,
    opts: &Options,
    f: impl FnOnce(bool) -> Result<T, Error> + Send,
) -> Result<T, Error> {
    if !opts.fence_idle || pid.thread_count().unwrap_or(0) < FENCE_MIN_THREADS {
        return f(false);
    }
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("livecare-tracer".into())
            .spawn_scoped(s, || f(true))
            .map_err(|e| {
                Error::Process(livecare_process::Error::Parse {
                    path: format!("/proc/{pid}"),
                    what: format!("cannot start the tracer thread: {e}"),
                })
            })?
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The patches some loaded object has the build-id of.
pub fn matching_patches<'p>(patches: &'p [Patch], objects: &[LoadedObject]) -> Vec<&'p Patch> {
    patches
        .iter()
        .filter(|p| {
            objects
                .iter()
                .any(|o| o.build_id.as_deref() == Some(&p.build_id))
        })
        .collect()
}

/// Like [`apply`], on threads the caller already holds (they stay held).
pub fn apply_held(
    threads: &mut ThreadSet,
    patches: &[Patch],
    opts: &Options,
) -> Result<Vec<ApplyReport>, Error> {
    let objects = loaded_objects(threads.pid())?;
    apply_with_objects(threads, patches, &objects, opts)
}

/// Applies every patch matching `objects` on held threads; all or nothing.
fn apply_with_objects(
    threads: &mut ThreadSet,
    patches: &[Patch],
    objects: &[LoadedObject],
    opts: &Options,
) -> Result<Vec<ApplyReport>, Error> {
    // `apply_one` refuses to build on an interrupted operation (it reads the regions
    // anyway), before the first patch changes anything.
    let mut done: Vec<ApplyReport> = Vec::new();
    for p in matching_patches(patches, objects) {
        match apply_one(threads, p, objects, opts) {
            Ok(r) => done.push(r),
            Err(e) => {
                // All or nothing: the patches applied before this one come off again,
                // in one stop (newest first).
                let addrs: Vec<u64> = done.iter().rev().map(|r| r.region).collect();
                if addrs.is_empty() {
                    return Err(e);
                }
                return match unpatch_regions(threads, &addrs, opts) {
                    Ok(_) => Err(e),
                    Err(re) => Err(Error::Unpatch(format!(
                        "{e}; rolling back the {} patch(es) applied before it failed too ({re}): \
                         they stay applied (see `livecare info`)",
                        addrs.len()
                    ))),
                };
            }
        }
    }
    Ok(done)
}

fn apply_one(
    threads: &mut ThreadSet,
    patch: &Patch,
    objects: &[LoadedObject],
    opts: &Options,
) -> Result<ApplyReport, Error> {
    let pid = threads.pid();
    let target = objects
        .iter()
        .find(|o| o.build_id.as_deref() == Some(&patch.build_id))
        .ok_or_else(|| Error::NoMatchingObject {
            pid: pid.0,
            build_id: patch.build_id.clone(),
            loaded: String::new(),
        })?;
    // One open of the memory and one read of the maps serve the whole prepare: the
    // regions, the hole, the stub's place and the unwind tables (none of which the new
    // region changes).
    let mem = RemoteMemory::open(pid)?;
    let maps = read_maps(pid)?;
    let regions = region::find_regions_in(&mem, &maps);
    refuse_if_interrupted_in(pid, &regions)?;
    // Above every region's, retired ones included: the order stays total.
    let last_seq = regions.iter().map(|r| r.seq).max().unwrap_or(0);
    let existing: Vec<RegionHeader> = regions
        .into_iter()
        .filter(|r| r.state == RegionState::Applied)
        .collect();
    let display_id = format!("{} ({})", patch.id(), patch.source.display());
    if existing.iter().any(|r| {
        r.build_id == patch.build_id
            && (r.hash == patch.hash
                // Storage levels may share a patch id (LibcarePlus' -i): the level tells.
                || (!patch.patch_id.is_empty() && patch.level == 0 && r.patch_id == patch.patch_id))
    }) {
        return Err(Error::AlreadyApplied {
            pid: pid.0,
            patch_id: display_id,
            build_id: patch.build_id.clone(),
        });
    }
    // Patch levels (LibCare storage): a higher level replaces the applied lower one.
    if patch.level > 0 {
        if let Some(old) = existing
            .iter()
            .filter(|r| r.build_id == patch.build_id && r.level > 0)
            .max_by_key(|r| r.seq)
        {
            if old.level >= patch.level {
                return Err(Error::AlreadyApplied {
                    pid: pid.0,
                    patch_id: format!("level {} (have level {})", patch.level, old.level),
                    build_id: patch.build_id.clone(),
                });
            }
            if let Some(later) = existing
                .iter()
                .find(|r| r.build_id == patch.build_id && r.seq > old.seq)
            {
                return Err(Error::Unpatch(format!(
                    "cannot replace level {} with level {}: patch {} was applied on top of it and must be removed first",
                    old.level, patch.level, later.patch_id
                )));
            }
            unpatch_regions(threads, &[old.addr], opts)?;
            return apply_one(threads, patch, objects, opts);
        }
    }
    let view = ObjectView::new(target)?;
    let all = views(objects);
    let elf = PatchElf::parse(patch)?;
    let read_u64 = |a: u64| mem.read_u64(a).ok();
    // A library's TLS variable may need a thread pointer to find its offset: stop one
    // thread (the region's mmap below stops one anyway) and read its fs_base.
    let thread_pointers: Vec<u64> =
        if target.kind != livecare_process::ElfKind::Executable && elf.has_tls_relocations() {
            let held = threads.tids().into_iter().any(|t| threads.is_stopped(t));
            let tid = threads.stop_one()?;
            let fs_base = threads.regs(tid)?.fs_base;
            // Let it go again unless the caller holds the threads: the region's mmap
            // then runs through the crash-safe stub (see `rsyscall`).
            if !held {
                threads.resume(tid)?;
                threads.release_others()?;
            }
            vec![fs_base]
        } else {
            Vec::new()
        };
    let mut lay = {
        let mut call = |addr: u64| threads.call_function(addr).map_err(Error::from);
        elf.layout(
            patch,
            target,
            &view,
            &all,
            &mut call,
            &prepare::TlsMemory {
                read_u64: &read_u64,
                thread_pointers: &thread_pointers,
            },
        )?
    };
    // Direct calls to the replaced functions: found now, so the header has room for
    // their undo records before the region is mapped.
    let sites = callsites::plan(target, &view, &elf.hunk_targets(&lay), &existing);
    lay.grow_header(sites.header_bytes());
    let base = hole_near(&maps, target, lay.size).ok_or_else(|| Error::NoHole {
        object: target.path.clone(),
        size: lay.size,
    })?;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
    let stub = rsyscall::Stub::find(threads, &mem, &maps)?;
    // Named before it exists: a livecare killed between the mmap and the header's
    // write leaves a mapping `info` can tell from the target's own.
    let mark = region::Mark::place(&mem, &maps, stub.site(), base, lay.size);
    let unmark = || {
        if let Some(m) = &mark {
            let _ = m.clear(&mem);
        }
    };
    // The mapping and the protection of its code part in one pass of one thread
    // through the stub (the mprotect only once the mapping is where it was asked):
    // the body and the header are written through /proc/PID/mem, which ignores
    // protections.
    let (results, ran) = stub.syscalls(
        threads,
        &mem,
        &[
            (
                "mmap",
                SYS_MMAP,
                [base, lay.size, PROT_RW, flags, u64::MAX, 0],
            ),
            (
                "mprotect",
                SYS_MPROTECT,
                [base, lay.exec_len, PROT_RX, 0, 0, 0],
            ),
        ],
        &|i, v| {
            if i == 0 {
                // Killed here: a mapping with no header and a stub in the padding.
                fault::point("in-mmap-stub");
            }
            v == base
        },
    );
    let mut results = results.into_iter();
    match results.next() {
        Some(Ok(got)) if got == base => {}
        Some(Ok(got)) => {
            // A kernel without MAP_FIXED_NOREPLACE treats it as a hint.
            let munmap = [got, lay.size, 0, 0, 0, 0];
            let _ = stub.syscall(threads, &mem, "munmap", SYS_MUNMAP, munmap);
            unmark();
            return Err(Error::NoHole {
                object: target.path.clone(),
                size: lay.size,
            });
        }
        Some(Err(e)) => {
            unmark();
            return Err(e);
        }
        None => {
            // Whether the mmap ran is unknown: the mark stays for `repair`, which
            // unmaps the mapping only if it is one livecare made.
            return Err(ran.err().unwrap_or(Error::NoHole {
                object: target.path.clone(),
                size: lay.size,
            }));
        }
    }
    let protected = match (results.next(), ran) {
        (Some(r), _) => r.map(|_| ()),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Err(Error::NoHole {
            object: target.path.clone(),
            size: lay.size,
        }),
    };
    // Mark the fresh mapping as ours at once (Prepared, no hunks), so a livecare
    // killed before the body is written leaves a region `info` lists and `repair`
    // unmaps, not an anonymous mapping nobody can tell from the target's own.
    let header_stub = RegionHeader {
        addr: base,
        total_len: lay.size,
        seq: 0,
        build_id: patch.build_id.clone(),
        patch_id: patch.id(),
        hash: patch.hash,
        level: patch.level,
        eh_frame: 0,
        eh_frame_len: 0,
        load_bias: target.load_bias,
        exec_len: 0,
        state: RegionState::Prepared,
        hunks: Vec::new(),
    };
    if mem.write(base, &header_stub.encode()).is_ok() {
        unmark();
    }
    fault::point("after-mmap");
    let result = protected.and_then(|_| {
        fill_and_commit(
            threads, &mem, &maps, patch, target, &view, &elf, &lay, base, &existing, last_seq,
            objects, &sites, opts,
        )
    });
    if result.is_err() {
        // Nothing jumps into the region yet (commit restores its jumps on failure).
        let munmap = [base, lay.size, 0, 0, 0, 0];
        let _ = stub.syscall(threads, &mem, "munmap", SYS_MUNMAP, munmap);
    }
    let (hunks, pause, attempts) = result?;
    Ok(ApplyReport {
        pid: pid.0,
        comm: pid.comm(),
        object: target.path.clone(),
        build_id: patch.build_id.clone(),
        patch_id: patch.id(),
        region: base,
        hunks,
        pause_us: pause.as_micros() as u64,
        pause_window_ns: threads.watch.last_window_ns.unwrap_or_default(),
        attempts,
        threads_fenced: threads.watch.last_fenced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            read: true,
            write: false,
            exec: false,
            offset: 0,
            dev: "00:00".into(),
            inode: 0,
            path: String::new(),
        }
    }

    #[test]
    fn hole_is_near_the_object_and_keeps_a_gap_from_every_mapping() {
        let obj = LoadedObject {
            path: "/x".into(),
            build_id: None,
            load_bias: 0x5555_0000_0000,
            ranges: std::iter::once(0x5555_0000_0000..0x5555_0000_4000).collect(),
            kind: livecare_process::ElfKind::Executable,
            map_file: String::new(),
            data: livecare_process::Bytes::from(Vec::new()),
        };
        // A neighbour right after the object forces the search further out.
        let maps = vec![
            map(0x5555_0000_0000, 0x5555_0000_4000),
            map(0x5555_0000_5000, 0x5555_0000_9000),
        ];
        let at = hole_near(&maps, &obj, 0x2000).unwrap();
        assert_eq!(at, 0x5555_0000_a000);
        for m in &maps {
            assert!(at + 0x2000 + 0x1000 <= m.start || at >= m.end + 0x1000);
        }
        assert!(at - obj.start() < 0x7fff_0000);
    }
}
