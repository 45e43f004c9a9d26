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
pub mod unwind;

use std::borrow::Cow;
use std::time::{Duration, Instant};

use livecare_process::arch::x86_64::{SYS_MMAP, SYS_MPROTECT, SYS_MUNMAP};
use livecare_process::{
    loaded_objects, read_maps, LoadedObject, MapEntry, Pid, RemoteMemory, ThreadSet,
};

use arch::{Native, PatchArch};
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
use safety::Busy;
pub use trust::check_trusted;

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

/// What one removed patch did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnpatchReport {
    /// Process.
    pub pid: i32,
    /// Build-id of the object.
    pub build_id: String,
    /// Patch id.
    pub patch_id: String,
    /// Region address.
    pub region: u64,
    /// The region stays mapped, inactive (see [`RegionState::Retired`]): something
    /// may still point into it. False once it is unmapped.
    pub retired: bool,
    /// Restored functions.
    pub hunks: usize,
    /// Pause in µs.
    pub pause_us: u64,
    /// The stop's first INTERRUPT and last resume, `CLOCK_MONOTONIC` ns.
    pub pause_window_ns: [u64; 2],
    /// Threads left fenced in their syscall during the stop, not stopped.
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
        reclaim_quietly(pid, opts);
    }
    res
}

/// [`reclaim`], whose failure only means the retired regions stay (they are listed
/// by `info`): it never fails the command that made them.
fn reclaim_quietly(pid: Pid, opts: &Options) -> Reclaimed {
    if opts.hold {
        return Reclaimed::default();
    }
    reclaim(pid, opts).unwrap_or_else(|e| {
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
    let display_id = if patch.patch_id.is_empty() {
        patch.source.display().to_string()
    } else {
        patch.patch_id.clone()
    };
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
        patch_id: patch.patch_id.clone(),
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
        patch_id: patch.patch_id.clone(),
        region: base,
        hunks,
        pause_us: pause.as_micros() as u64,
        pause_window_ns: threads.watch.last_window_ns.unwrap_or_default(),
        attempts,
        threads_fenced: threads.watch.last_fenced,
    })
}

#[allow(clippy::too_many_arguments)]
fn fill_and_commit(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    patch: &Patch,
    target: &LoadedObject,
    view: &ObjectView,
    elf: &PatchElf,
    lay: &prepare::Layout,
    base: u64,
    existing: &[RegionHeader],
    last_seq: u64,
    objects: &[LoadedObject],
    sites: &callsites::Plan,
    opts: &Options,
) -> Result<(Vec<Hunk>, Duration, u32), Error> {
    let relerr = |what: String| Error::Relocate {
        path: patch.source.clone(),
        what,
    };
    let (mut image, mut hunks, eh) = elf.relocate(lay, base).map_err(relerr)?;
    // Verify the target is what the patch was made for, before writing anything.
    for h in &mut hunks {
        let verr = |what: String| Error::Verify {
            function: h.name.clone(),
            addr: h.daddr,
            object: target.path.clone(),
            what,
        };
        if !target.contains(h.daddr) || !target.contains(h.daddr + h.dlen as u64 - 1) {
            return Err(verr("address outside the object".into()));
        }
        if view.has_symtab {
            match view.funcs_by_addr.get(&h.daddr) {
                Some((n, sz)) if *n == h.name && *sz == h.dlen as u64 => {}
                Some((n, sz)) => {
                    return Err(verr(format!(
                        "the object has {n} ({sz} bytes) there, the patch expects {} ({} bytes)",
                        h.name, h.dlen
                    )))
                }
                None => return Err(verr("no function starts there in the object".into())),
            }
        }
        if !view.has_symtab
            && !view.fdes.is_empty()
            && view.fdes.get(&h.daddr) != Some(&(h.dlen as u64))
        {
            return Err(verr(format!(
                "no {}-byte function starts there according to the object's .eh_frame",
                h.dlen
            )));
        }
        let disk = ObjectView::file_bytes(target, h.daddr, h.dlen as usize)
            .ok_or_else(|| verr("not in the file's loaded segments".into()))?;
        let live = mem.read_vec(h.daddr, h.dlen as usize)?;
        let jl = Native::JUMP_LEN;
        if live[jl..] != disk[jl..] {
            return Err(verr("code in memory differs from the file".into()));
        }
        if live[..jl] != disk[..jl] {
            // Only acceptable as the jump of an earlier patch of ours.
            let top = existing
                .iter()
                .rev()
                .flat_map(|r| r.hunks.iter())
                .find(|x| x.daddr == h.daddr);
            let ok = top
                .and_then(|t| Native::jump(h.daddr, t.saddr))
                .is_some_and(|j| j[..] == live[..jl]);
            if !ok {
                return Err(verr("entry bytes were modified by someone else".into()));
            }
        }
        Native::jump(h.daddr, h.saddr).ok_or_else(|| verr("new body out of jump range".into()))?;
        let n = region::SAVED_LEN.min(live.len());
        h.saved[..n].copy_from_slice(&live[..n]);
        // Rewriting the same bytes now takes the copy-on-write of the code page
        // (about 16 µs each) outside the pause.
        mem.write(h.daddr, &live[..jl])?;
    }
    callsites::prepare(mem, sites, &mut hunks, existing)?;
    let mut header = RegionHeader {
        addr: base,
        total_len: lay.size,
        seq: last_seq + 1,
        build_id: patch.build_id.clone(),
        patch_id: if patch.patch_id.is_empty() {
            format!("{:016x}", patch.hash)
        } else {
            patch.patch_id.clone()
        },
        hash: patch.hash,
        level: patch.level,
        eh_frame: eh.map(|e| e.0).unwrap_or(0),
        eh_frame_len: eh.map(|e| e.1).unwrap_or(0),
        load_bias: target.load_bias,
        exec_len: lay.exec_len,
        state: RegionState::Prepared,
        hunks: hunks.clone(),
    };
    let hb = header.encode();
    if hb.len() as u64 > PatchElf::header_len(lay) {
        return Err(relerr("region header does not fit".into()));
    }
    image[..hb.len()].copy_from_slice(&hb);
    mem.write(base, &image)?;

    let busy: Vec<Busy> = hunks
        .iter()
        .map(|h| Busy {
            range: h.daddr..h.daddr + h.dlen as u64,
            name: h.name.clone(),
        })
        .collect();
    let mut writes: Vec<(u64, Vec<u8>, Vec<u8>)> = hunks
        .iter()
        .map(|h| {
            (
                h.daddr,
                Native::jump(h.daddr, h.saddr).unwrap_or_default(),
                h.saved[..Native::JUMP_LEN].to_vec(),
            )
        })
        .collect();
    writes.extend(callsites::retarget_writes(&hunks));
    header.state = RegionState::Applied;
    let mut unwinder = safety::build_unwinder(mem, maps, objects, existing);
    let (pause, attempts) = commit(
        threads,
        mem,
        maps,
        &mut unwinder,
        &busy,
        &writes,
        Some((base, RegionState::Applied)),
        "patch",
        opts,
    )?;
    Ok((hunks, pause, attempts))
}

/// How long one busy thread may run alone towards its return address before every
/// thread is resumed (it might wait for a lock held by a stopped thread).
const BREAKPOINT_WAIT: Duration = Duration::from_millis(200);

/// A contiguous range of target code covering one or more hunk writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriteSpan {
    start: u64,
    len: usize,
}

/// Hunks closer than this, or on the same page, share one read and one write in the
/// stop (the bytes between them are rewritten with what was read in the same stop).
/// Each write to `/proc/PID/mem` costs 2–6 µs inside the stop (a cold kernel path),
/// copying a few more bytes far less.
const SPAN_MERGE_GAP: u64 = 256;

/// The page size spans are merged within.
const SPAN_PAGE: u64 = 4096;

/// Groups `(addr, new, old)` writes into spans of nearby addresses, sorted by address.
fn write_spans(writes: &[(u64, Vec<u8>, Vec<u8>)]) -> Vec<WriteSpan> {
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|(a, new, old)| (*a, *a + new.len().max(old.len()) as u64))
        .collect();
    ranges.sort_unstable();
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in ranges {
        match spans.last_mut() {
            Some(last)
                if lo <= last.1 + SPAN_MERGE_GAP || lo / SPAN_PAGE == (last.1 - 1) / SPAN_PAGE =>
            {
                last.1 = last.1.max(hi)
            }
            _ => spans.push((lo, hi)),
        }
    }
    spans
        .into_iter()
        .map(|(lo, hi)| WriteSpan {
            start: lo,
            len: (hi - lo) as usize,
        })
        .collect()
}

/// The span holding `addr` and the offset of `addr` in it (`addr` came from the same
/// writes the spans were built from, so it is always covered).
fn span_of(spans: &[WriteSpan], addr: u64) -> (usize, usize) {
    let i = spans.partition_point(|s| s.start <= addr) - 1;
    (i, (addr - spans[i].start) as usize)
}

/// The state a region's journal word holds while the code writes that lead to
/// `target` are under way.
fn in_flight(target: RegionState) -> RegionState {
    match target {
        RegionState::Applied => RegionState::Committing,
        _ => RegionState::Removing,
    }
}

/// The state a region had before a commit towards `target` began.
fn before(target: RegionState) -> RegionState {
    match target {
        RegionState::Applied => RegionState::Prepared,
        _ => RegionState::Applied,
    }
}

/// Stops all threads, checks `busy`, writes `(addr, new, expected_old)` and the state
/// word of `region`, resumes; retries with backoff until the timeout.
#[allow(clippy::too_many_arguments)]
fn commit(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    unwinder: &mut unwind::Unwinder,
    busy: &[Busy],
    writes: &[(u64, Vec<u8>, Vec<u8>)],
    region_state: Option<(u64, RegionState)>,
    action: &'static str,
    opts: &Options,
) -> Result<(Duration, u32), Error> {
    let journal: Vec<(u64, RegionState)> = region_state.into_iter().collect();
    commit_journal(
        threads, mem, maps, unwinder, busy, writes, &journal, action, opts,
    )
}

/// [`commit`] for several regions at once: every region's state word is the journal.
/// Each word is set to `Committing`/`Removing` before the stop and to its final state
/// once the threads are released, so a livecare killed in between leaves a state
/// `info` reports and `repair` resolves from the code bytes it finds (all written:
/// complete; some: roll back or finish the removal; none: unmap or nothing). Both
/// writes stay out of the stop, where each would cost 2–6 µs of pause; a failed
/// commit puts the words back. A busy thread is caught at its return
/// through the first region's trampoline (see [`trampoline`]).
#[allow(clippy::too_many_arguments)]
fn commit_journal(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    unwinder: &mut unwind::Unwinder,
    busy: &[Busy],
    writes: &[(u64, Vec<u8>, Vec<u8>)],
    journal: &[(u64, RegionState)],
    action: &'static str,
    opts: &Options,
) -> Result<(Duration, u32), Error> {
    fault::point(if action == "patch" {
        "after-body"
    } else {
        "before-stop"
    });
    let spans = write_spans(writes);
    safety::prewarm(unwinder, mem, maps, threads);
    let tramp = journal
        .first()
        .and_then(|(base, _)| RegionHeader::trampoline_at(mem, *base));
    let set_states = |to: &dyn Fn(RegionState) -> RegionState| -> Result<(), Error> {
        for (base, state) in journal {
            mem.write(
                base + RegionHeader::STATE_OFFSET,
                &to(*state).word().to_le_bytes(),
            )?;
        }
        Ok(())
    };
    // Journal first: from here on, a kill leaves Committing/Removing behind. A word
    // left in flight by a failed write here would make `repair` act on a commit that
    // never began (finish a removal nobody made), so all are put back.
    if let Err(e) = set_states(&|s| in_flight(s)) {
        let _ = set_states(&before);
        return Err(e);
    }
    let mut written = false;
    let res = commit_loop(
        threads,
        mem,
        maps,
        unwinder,
        busy,
        writes,
        &spans,
        tramp,
        action,
        opts,
        &mut written,
    );
    if written {
        // The final state, once every code write is in place (even if releasing the
        // threads then failed: the code is what the state must describe).
        set_states(&|s| s)?;
    } else {
        // Nothing written, or what was written put back in the same stop.
        let _ = set_states(&before);
    }
    res
}

/// The stop-check-write loop of [`commit_journal`], retried while a thread is busy.
#[allow(clippy::too_many_arguments)]
fn commit_loop(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    unwinder: &mut unwind::Unwinder,
    busy: &[Busy],
    writes: &[(u64, Vec<u8>, Vec<u8>)],
    spans: &[WriteSpan],
    tramp: Option<u64>,
    action: &'static str,
    opts: &Options,
    written: &mut bool,
) -> Result<(Duration, u32), Error> {
    let pid = threads.pid();
    let start = Instant::now();
    let mut backoff = Duration::from_micros(500);
    let mut attempts = 0u32;
    let ranges: Vec<(u64, usize)> = spans.iter().map(|s| (s.start, s.len)).collect();
    let mut reads = safety::StopReads::new(maps, ranges);
    // The spans as they will be written, assembled in the stop into buffers allocated
    // (and touched) before it.
    let mut wanted: Vec<Vec<u8>> = spans.iter().map(|s| vec![0u8; s.len]).collect();
    // Offenders among the fenced threads, judged before the stop: a fenced thread runs
    // no user code, so its frames stay as they are until it stops at its syscall's
    // exit, and a thread that has stopped is judged again inside the stop.
    let mut fenced_offenders = Vec::new();
    loop {
        // A process that came to share the memory since the seize: checked before each
        // stop, outside it (it costs a read per thread).
        wait_for_memory_sharers(threads, action, start, opts.timeout)?;
        attempts += 1;
        if opts.fence_idle && attempts == 1 {
            // Last thing before the stop: a fenced thread that wakes waits at its exit
            // stop until the commit is over.
            threads.fence_idle()?;
        }
        // Every thread fenced now is judged here, and no thread is fenced later in
        // this loop (between attempts they can only stop and be let go).
        if attempts == 1 && threads.fenced_count() > 0 {
            let pick = |t| threads.is_fenced(t);
            fenced_offenders = safety::offenders(
                threads,
                mem,
                maps,
                unwinder,
                busy,
                &mut safety::StopReads::default(),
                &pick,
            )?;
        }
        // The syscalls of the stop, made once just before it (see `rehearse`).
        threads.rehearse();
        reads.rehearse(mem);
        let t0 = Instant::now();
        threads.interrupt_all()?;

        let t_stopped = Instant::now();
        let mut t_checked = t_stopped;
        let res = (|| -> Result<Option<safety::Offender>, Error> {
            // One read and one write per span of nearby hunks, not per hunk, and the
            // reads go in the same batch as the stacks: each syscall inside the stop
            // lengthens the pause.
            let unjudged = |t| !threads.is_fenced(t);
            let now = safety::offenders(threads, mem, maps, unwinder, busy, &mut reads, &unjudged)?;
            let still_fenced = fenced_offenders.iter().filter(|o| threads.is_fenced(o.tid));
            if let Some(off) = now
                .into_iter()
                .chain(still_fenced.cloned())
                .min_by_key(|o| o.tid)
            {
                return Ok(Some(off));
            }
            t_checked = Instant::now();
            let mut current: Vec<Cow<[u8]>> = Vec::with_capacity(spans.len());
            for (i, span) in spans.iter().enumerate() {
                current.push(match reads.also(i) {
                    Some(b) => Cow::Borrowed(b),
                    // Read again alone for the error that says why.
                    None => Cow::Owned(mem.read_vec(span.start, span.len)?),
                });
            }
            for (addr, _, old) in writes {
                let (i, off) = span_of(spans, *addr);
                if current[i].get(off..off + old.len()) != Some(&old[..]) {
                    return Err(Error::Verify {
                        function: busy
                            .iter()
                            .find(|b| b.range.contains(addr))
                            .map_or_else(|| format!("code at {addr:#x}"), |b| b.name.clone()),
                        addr: *addr,
                        object: String::new(),
                        what: "code changed while preparing".into(),
                    });
                }
            }
            for (w, c) in wanted.iter_mut().zip(&current) {
                w.copy_from_slice(c);
            }
            for (addr, new, _) in writes {
                let (i, off) = span_of(spans, *addr);
                wanted[i][off..off + new.len()].copy_from_slice(new);
            }
            let half = if action == "patch" {
                "half-jumps"
            } else {
                "half-restores"
            };
            if fault::armed(half) {
                // Half of the functions: every write (entry jump, call site) that
                // leads to the first half of the new bodies (patch) or away from them.
                let mut targets: Vec<Option<u64>> = Vec::new();
                let key = |(addr, new, old): &(u64, Vec<u8>, Vec<u8>)| {
                    fault::branch_target(*addr, if action == "patch" { new } else { old })
                };
                for w in writes {
                    if !targets.contains(&key(w)) {
                        targets.push(key(w));
                    }
                }
                let first = &targets[..targets.len().div_ceil(2)];
                for w in writes.iter().filter(|w| first.contains(&key(w))) {
                    mem.write(w.0, &w.1)?;
                }
                fault::point(half);
            }
            for (i, span) in spans.iter().enumerate() {
                if let Err(e) = mem.write(span.start, &wanted[i]) {
                    // Put back the spans already written (and this one, which may be
                    // partly written): bytes read in this same stop.
                    for (j, done) in spans.iter().enumerate().take(i + 1) {
                        let _ = mem.write(done.start, &current[j]);
                    }
                    return Err(e.into());
                }
            }
            *written = true;
            Ok(None)
        })();
        match res {
            Ok(None) => {
                if opts.hold {
                    return Ok((Duration::ZERO, attempts));
                }
                let t_written = Instant::now();
                // Resume by detaching: DETACH lets a stopped thread run just as CONT
                // does, and the threads are free at once. Resuming and detaching later
                // would stop every thread a second time (a tracee must be stopped to be
                // detached). Later steps that need a thread (the unpatch's munmap, the
                // next patch) seize again, outside any pause.
                threads.detach_all()?;
                tracing::debug!(
                    interrupt_us = (t_stopped - t0).as_micros() as u64,
                    check_us = (t_checked - t_stopped).as_micros() as u64,
                    write_us = (t_written - t_checked).as_micros() as u64,
                    resume_us = t_written.elapsed().as_micros() as u64,
                    "{action} commit phases"
                );
                return Ok((threads.watch.last.unwrap_or_default(), attempts));
            }
            Ok(Some(off)) => {
                if start.elapsed() >= opts.timeout {
                    threads.resume_all()?;
                    return Err(Error::Unsafe {
                        action,
                        pid: pid.0,
                        tid: off.tid.0,
                        function: off.name,
                        secs: start.elapsed().as_secs_f64(),
                    });
                }
                // Let only the busy thread run to where its outermost busy frame
                // returns; everything else stays stopped, and threads it creates
                // start stopped. It is caught by a trampoline, not a breakpoint, so
                // a livecare killed meanwhile leaves nothing that can trap.
                let slot = match (off.return_to, tramp) {
                    // A fenced thread sleeps in its syscall: only time gets it out.
                    _ if threads.is_fenced(off.tid) => None,
                    (Some(_), Some(_)) => {
                        trampoline::return_slot(threads, mem, unwinder, off.tid, busy)
                    }
                    _ => None,
                };
                tracing::debug!(
                    tid = off.tid.0,
                    return_to = ?off.return_to,
                    slot = ?slot,
                    tramp = ?tramp,
                    "busy thread: {}",
                    off.name
                );
                if let (Some((slot, ret)), Some(tramp)) = (slot, tramp) {
                    let left = opts
                        .timeout
                        .saturating_sub(start.elapsed())
                        .min(BREAKPOINT_WAIT);
                    if trampoline::run_to_return(threads, mem, off.tid, slot, ret, tramp, left)? {
                        continue; // re-check at once, still inside the same stop
                    }
                }
                threads.resume_all()?;
                // Stops that come meanwhile (a fenced thread woke) are let go at once.
                threads.idle(backoff)?;
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
            Err(e) => {
                threads.resume_all()?;
                return Err(e);
            }
        }
    }
}

/// Which patches to remove.
#[derive(Debug, Clone, Default)]
pub struct UnpatchSelect {
    /// Only the patch with this id.
    pub patch_id: Option<String>,
    /// Only patches of objects with these build-ids (the latest of each).
    pub build_ids: Vec<String>,
}

/// Removes patches from `pid`: by default the most recent one; last-in first-out per
/// object (removing an older patch under a newer one is refused).
pub fn unpatch(pid: Pid, sel: &UnpatchSelect, opts: &Options) -> Result<Vec<UnpatchReport>, Error> {
    check_pid(pid)?;
    // Before the regions are read: another livecare's commit in progress is not an
    // interrupted one. Held until we return.
    let _lock = TargetLock::acquire(pid)?;
    let all = find_regions(pid)?;
    refuse_if_interrupted_in(pid, &all)?;
    let regions: Vec<RegionHeader> = all
        .into_iter()
        .filter(|r| r.state == RegionState::Applied)
        .collect();
    if regions.is_empty() {
        return Err(Error::Unpatch(format!("no patches applied to pid {pid}")));
    }
    let mut chosen: Vec<&RegionHeader> = Vec::new();
    if let Some(id) = &sel.patch_id {
        chosen.extend(regions.iter().filter(|r| {
            &r.patch_id == id && (sel.build_ids.is_empty() || sel.build_ids.contains(&r.build_id))
        }));
        if chosen.is_empty() {
            return Err(Error::Unpatch(format!(
                "patch {id} is not applied to pid {pid}"
            )));
        }
    } else if !sel.build_ids.is_empty() {
        for b in &sel.build_ids {
            match regions
                .iter()
                .filter(|r| &r.build_id == b)
                .max_by_key(|r| r.seq)
            {
                Some(r) => chosen.push(r),
                None => {
                    return Err(Error::Unpatch(format!(
                        "no patch applied to build-id {b} in pid {pid}"
                    )))
                }
            }
        }
    } else if let Some(r) = regions.iter().max_by_key(|r| r.seq) {
        chosen.push(r);
    }
    for r in &chosen {
        if let Some(later) = regions
            .iter()
            .filter(|x| x.build_id == r.build_id && x.seq > r.seq)
            .max_by_key(|x| x.seq)
        {
            if !chosen.iter().any(|c| c.seq == later.seq) {
                return Err(Error::Unpatch(format!(
                    "patch {} must be removed before patch {} (build-id {}): patches are removed last-in, first-out",
                    later.patch_id, r.patch_id, r.build_id
                )));
            }
        }
    }
    chosen.sort_by_key(|r| std::cmp::Reverse(r.seq));
    let addrs: Vec<u64> = chosen.iter().map(|r| r.addr).collect();
    let mut out = on_tracer_thread(pid, opts, |fence| {
        let mut threads = seize(pid, opts, fence, "unpatch")?;
        let out = unpatch_regions(&mut threads, &addrs, opts)?;
        fault::point("before-detach");
        threads.detach_all()?;
        Ok(out)
    })?;
    // The regions just retired, and any retired before, go once nothing points
    // into them (after the tracer thread's exit: fenced threads are free again).
    let gone = reclaim_quietly(pid, opts).unmapped;
    for r in &mut out {
        r.retired = !gone.contains(&r.region);
    }
    Ok(out)
}

/// Removes the regions at `addrs` (newest first) in one stop: every restore of every
/// region is written, or none is. The regions are retired, not unmapped: a thread may
/// still use their data (see [`reclaim`]).
fn unpatch_regions(
    threads: &mut ThreadSet,
    addrs: &[u64],
    opts: &Options,
) -> Result<Vec<UnpatchReport>, Error> {
    let pid = threads.pid();
    let mem = RemoteMemory::open(pid)?;
    let all = find_regions(pid)?;
    let maps = read_maps(pid)?;
    let objects = loaded_objects(pid)?;
    let mut unwinder = safety::build_unwinder(&mem, &maps, &objects, &all);
    let mut writes: Vec<(u64, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut busy = Vec::new();
    let mut journal = Vec::new();
    let mut chosen = Vec::new();
    for addr in addrs {
        let Some(r) = all.iter().find(|r| r.addr == *addr) else {
            continue;
        };
        let mut region_writes = Vec::new();
        for h in &r.hunks {
            let jump = Native::jump(h.daddr, h.saddr).unwrap_or_default();
            region_writes.push((h.daddr, h.saved[..Native::JUMP_LEN].to_vec(), jump));
        }
        region_writes.extend(callsites::restore_writes(&r.hunks));
        merge_newer_first(&mut writes, region_writes);
        busy.push(Busy {
            range: r.addr..r.addr + r.exec_len,
            name: format!("patch {} code", r.patch_id),
        });
        for h in &r.hunks {
            busy.insert(
                0,
                Busy {
                    range: h.saddr..h.saddr + h.slen as u64,
                    name: format!("{} (patched)", h.name),
                },
            );
        }
        // Marked inactive together with the restore; kept mapped, since a thread may
        // still use its data with no frame of it on the stack (see `reclaim`).
        journal.push((r.addr, RegionState::Retired));
        chosen.push(r);
    }
    if chosen.is_empty() {
        return Ok(Vec::new());
    }
    let (pause, _) = commit_journal(
        threads,
        &mem,
        &maps,
        &mut unwinder,
        &busy,
        &writes,
        &journal,
        "unpatch",
        opts,
    )?;
    let window = threads.watch.last_window_ns.unwrap_or_default();
    let fenced = threads.watch.last_fenced;
    // Where the region used to be unmapped; now before the reclaim.
    fault::point("before-munmap");
    Ok(chosen
        .iter()
        .map(|r| UnpatchReport {
            pid: pid.0,
            build_id: r.build_id.clone(),
            patch_id: r.patch_id.clone(),
            region: r.addr,
            retired: true,
            hunks: r.hunks.len(),
            pause_us: pause.as_micros() as u64,
            pause_window_ns: window,
            threads_fenced: fenced,
        })
        .collect())
}

/// Adds an older region's restore writes to those of newer ones: where both write the
/// same place, the bytes expected now stay the newest region's and the bytes written
/// become the older one's (what was there before any of them).
fn merge_newer_first(
    writes: &mut Vec<(u64, Vec<u8>, Vec<u8>)>,
    older: Vec<(u64, Vec<u8>, Vec<u8>)>,
) {
    for (addr, new, old) in older {
        match writes
            .iter_mut()
            .find(|w| w.0 == addr && w.1.len() == new.len())
        {
            Some(w) => w.1 = new,
            None => writes.push((addr, new, old)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stacked_restores_write_the_oldest_bytes_expecting_the_newest() {
        // Newer region B jumps over older region A's jump at 0x1000; removing both
        // in one stop expects B's jump and writes what was there before A.
        let mut w = vec![(0x1000, b"jmpA".to_vec(), b"jmpB".to_vec())];
        super::merge_newer_first(
            &mut w,
            vec![
                (0x1000, b"orig".to_vec(), b"jmpA".to_vec()),
                (0x2000, b"orig".to_vec(), b"jmpA".to_vec()),
            ],
        );
        assert_eq!(
            w,
            vec![
                (0x1000, b"orig".to_vec(), b"jmpB".to_vec()),
                (0x2000, b"orig".to_vec(), b"jmpA".to_vec()),
            ]
        );
    }

    #[test]
    fn nearby_hunks_share_one_span_and_far_ones_do_not() {
        let w = |a: u64| (a, vec![0xe9; 5], vec![0x55; 5]);
        let writes = vec![w(0x1040), w(0x1000), w(0x1100), w(0x9000)];
        let spans = write_spans(&writes);
        assert_eq!(
            spans,
            vec![
                WriteSpan {
                    start: 0x1000,
                    len: 0x105
                },
                WriteSpan {
                    start: 0x9000,
                    len: 5
                }
            ]
        );
        assert_eq!(span_of(&spans, 0x1040), (0, 0x40));
        assert_eq!(span_of(&spans, 0x1100), (0, 0x100));
        assert_eq!(span_of(&spans, 0x9000), (1, 0));
    }

    #[test]
    fn hunks_on_one_page_share_a_span_however_far_apart_but_not_across_pages() {
        let w = |a: u64| (a, vec![0xe9; 5], vec![0x55; 5]);
        // 0x1010 and 0x1f00 share a page; 0x2400 is 0x4fb bytes on, on the next page.
        let spans = write_spans(&[w(0x1f00), w(0x1010), w(0x2400)]);
        assert_eq!(
            spans,
            vec![
                WriteSpan {
                    start: 0x1010,
                    len: 0xef5
                },
                WriteSpan {
                    start: 0x2400,
                    len: 5
                }
            ]
        );
    }

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
