//! Recovery after a livecare that died mid-operation.
//!
//! The region header's state word is the journal (see [`crate::RegionState`]): a
//! region left `Committing` or `Removing` had its code writes cut short, and one left
//! `Prepared` was never committed. [`check`]
//! reads every such region and the live bytes of each of its code writes (function
//! entry jumps, retargeted call sites) and says what [`repair`] would do; [`repair`]
//! does it in a stop like a normal commit: it completes a commit whose writes all
//! landed, rolls back any other, finishes an interrupted removal, and unmaps leftover
//! regions once no thread can execute there. A region whose new code may have run
//! (a removal, a rollback of jumps that were live) is retired, not unmapped, as
//! unpatch does (see [`crate::reclaim`]). Live bytes matching neither side are left
//! alone and reported.

use std::time::{Duration, Instant};

use livecare_process::arch::x86_64::SYS_MUNMAP;
use livecare_process::{loaded_objects, read_maps, Pid, RemoteMemory, ThreadSet};

use crate::arch::{Native, PatchArch};
use crate::region::{find_regions, leftovers_in, Leftover, Mark, RegionHeader, RegionState};
use crate::rsyscall::{padding_windows, Window};
use crate::safety::{self, Busy};
use crate::{callsites, Error, Options};

/// What `repair` does (or would do) with a region that is not cleanly applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Interrupted commit whose code writes all landed: mark it applied.
    Complete,
    /// Interrupted commit: undo the writes that landed; unmap the region if none had,
    /// retire it otherwise.
    RollBack,
    /// Interrupted unpatch: undo the writes still live, retire the region.
    FinishRemoval,
    /// Never committed or already removed: nothing jumps there; unmap it.
    Unmap,
    /// The live bytes match neither the old nor the new code: left alone.
    Stuck(String),
}

/// A region that is not cleanly applied, with the state of its code writes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionCheck {
    /// The region (its `state` is the journal word found).
    pub region: RegionHeader,
    /// Code writes of the patch (entry jumps, call sites) in place now.
    pub writes_live: usize,
    /// Code writes of the patch in all.
    pub writes_total: usize,
    /// Functions whose entry jump into this region is in place.
    pub functions_live: Vec<String>,
    /// What `repair` does with it.
    pub verdict: Verdict,
}

/// What `repair` did to one region.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RepairReport {
    /// Process.
    pub pid: i32,
    /// Region address.
    pub region: u64,
    /// Patch id.
    pub patch_id: String,
    /// Build-id of the object.
    pub build_id: String,
    /// Journal state found.
    pub state: RegionState,
    /// Action taken.
    pub action: Verdict,
    /// Code writes made (restores or completed jumps).
    pub writes: usize,
    /// The region was unmapped.
    pub unmapped: bool,
}

/// Result of [`repair`] for one process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repaired {
    /// Process.
    pub pid: i32,
    /// Threads moved off a trampoline redirect a dead livecare left behind.
    pub redirects_undone: usize,
    /// One entry per region acted on (or found stuck).
    pub regions: Vec<RepairReport>,
    /// Leftovers outside any region header removed: mappings with no header yet
    /// unmapped, marks and stubs cleared from the code padding.
    pub leftovers_removed: Vec<Leftover>,
}

/// How long `repair` waits for threads to leave remote-syscall stubs a killed
/// livecare left them in (each returns on its own within about a second).
const STUB_WAIT: Duration = Duration::from_secs(5);

/// Stops every thread with none inside a stub: a thread a killed livecare left in one
/// finishes it on its own, so it is let run until it has (up to [`STUB_WAIT`]).
fn stop_outside_stubs(threads: &mut ThreadSet, mem: &RemoteMemory) -> Result<(), Error> {
    let stubs: Vec<u64> = padding_windows(mem, &read_maps(threads.pid())?, false)?
        .into_iter()
        .filter(|w| w.1 == Window::Stub)
        .map(|w| w.0)
        .collect();
    let deadline = Instant::now() + STUB_WAIT;
    loop {
        threads.interrupt_all()?;
        let mut inside = false;
        for t in threads.tids() {
            let pc = threads.regs(t)?.rip;
            inside |= stubs
                .iter()
                .any(|&s| (s..s + crate::rsyscall::WINDOW).contains(&pc));
        }
        if !inside || Instant::now() >= deadline {
            return Ok(());
        }
        threads.resume_all()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The patch's code writes for region `r`: `(addr, new, old)`.
fn apply_writes(r: &RegionHeader) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    let mut w: Vec<(u64, Vec<u8>, Vec<u8>)> = r
        .hunks
        .iter()
        .filter_map(|h| {
            Some((
                h.daddr,
                Native::jump(h.daddr, h.saddr)?,
                h.saved[..Native::JUMP_LEN].to_vec(),
            ))
        })
        .collect();
    w.extend(callsites::retarget_writes(&r.hunks));
    w
}

/// Every region of `pid` that is not cleanly applied, with what `repair` would do
/// (`rollback`: roll back interrupted commits even when all their writes landed).
pub fn check(pid: Pid, rollback: bool) -> Result<Vec<RegionCheck>, Error> {
    let mem = RemoteMemory::open(pid)?;
    let mut out = Vec::new();
    for r in find_regions(pid)? {
        if matches!(r.state, RegionState::Applied | RegionState::Retired) {
            continue;
        }
        let writes = apply_writes(&r);
        let mut live = 0;
        let mut other = Vec::new();
        for (addr, new, old) in &writes {
            match mem.read_vec(*addr, new.len()) {
                Ok(b) if &b == new => live += 1,
                Ok(b) if &b == old => {}
                _ => other.push(*addr),
            }
        }
        let functions_live = r
            .hunks
            .iter()
            .filter(|h| {
                let j = Native::jump(h.daddr, h.saddr);
                j.is_some() && mem.read_vec(h.daddr, Native::JUMP_LEN).ok() == j
            })
            .map(|h| h.name.clone())
            .collect();
        let stuck = |what: &str| {
            Verdict::Stuck(format!(
                "{what}: code at {} matches neither the original nor the patch",
                other
                    .iter()
                    .map(|a| format!("{a:#x}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        let verdict = match r.state {
            // In a removal of stacked patches, a place shared with an older region
            // may already hold the older region's bytes (neither ours nor our saved
            // ones): finishing only needs the writes still live undone.
            RegionState::Removing => Verdict::FinishRemoval,
            RegionState::Committing if !other.is_empty() => stuck("interrupted commit"),
            RegionState::Committing if live == writes.len() && !rollback => Verdict::Complete,
            RegionState::Committing => Verdict::RollBack,
            _ if live > 0 => Verdict::Stuck(format!(
                "marked not applied, but {live} of its code writes are live"
            )),
            _ => Verdict::Unmap,
        };
        out.push(RegionCheck {
            region: r,
            writes_live: live,
            writes_total: writes.len(),
            functions_live,
            verdict,
        });
    }
    Ok(out)
}

/// Unmaps the mappings livecares killed before their header left (nothing was ever
/// written there, so nothing uses them), clears the marks, and reports the stubs the
/// stop before cleared.
fn remove_leftovers(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    stubs_before: Vec<Leftover>,
    out: &mut Repaired,
) -> Result<(), Error> {
    let now = leftovers_in(mem, &read_maps(threads.pid())?);
    // Stubs the stop cleared.
    for l in stubs_before {
        if !now.contains(&l) {
            out.leftovers_removed.push(l);
        }
    }
    for l in now {
        match &l {
            Leftover::Mapping { addr, len, mark } => {
                crate::rsyscall::syscall(threads, "munmap", SYS_MUNMAP, [*addr, *len, 0, 0, 0, 0])?;
                Mark {
                    at: *mark,
                    base: *addr,
                    len: *len,
                }
                .clear(mem)?;
            }
            Leftover::Mark { at } => {
                let w = mem.read_vec(*at, crate::rsyscall::WINDOW as usize)?;
                if let Some(m) = Mark::decode(*at, &w) {
                    m.clear(mem)?;
                }
            }
            // Still there: a thread was in it when the stop cleared the others.
            Leftover::Stub { .. } => continue,
        }
        out.leftovers_removed.push(l);
    }
    Ok(())
}

/// Brings every region of `pid` that is not cleanly applied to a clean state (see
/// the module doc): seizes the process, undoes trampoline redirects left behind,
/// then per region completes, rolls back, finishes the removal or unmaps, each in a
/// stop with the usual safety check; resumes and detaches.
pub fn repair(pid: Pid, rollback: bool, opts: &Options) -> Result<Repaired, Error> {
    crate::check_pid(pid)?;
    // A live livecare's operation is not an interrupted one: never "repair" it.
    let _lock = crate::TargetLock::acquire(pid)?;
    let checks = check(pid, rollback)?;
    let mut out = Repaired {
        pid: pid.0,
        redirects_undone: 0,
        regions: Vec::new(),
        leftovers_removed: Vec::new(),
    };
    let all = find_regions(pid)?;
    ThreadSet::refuse_stopped(pid)?;
    let mut threads = ThreadSet::seize(pid).map_err(|e| crate::lock::explain_seize(pid, e))?;
    let mem = RemoteMemory::open(pid)?;
    let stubs_before: Vec<Leftover> = leftovers_in(&mem, &read_maps(pid)?)
        .into_iter()
        .filter(|l| matches!(l, Leftover::Stub { .. }))
        .collect();
    // A dead livecare may have left a thread due to return through a trampoline:
    // send it straight to its return address before any region can go away.
    stop_outside_stubs(&mut threads, &mem)?;
    let undone = (|| -> Result<usize, Error> {
        // Remote-syscall stubs left behind are cleared too (not counted: harmless).
        crate::rsyscall::clear_stale(&threads, &mem)?;
        let mut n = 0;
        for r in &all {
            if let Some(t) = RegionHeader::trampoline_at(&mem, r.addr) {
                n += crate::trampoline::undo_stale(&threads, &mem, t)?;
            }
        }
        Ok(n)
    })();
    threads.resume_all()?;
    out.redirects_undone = undone?;
    remove_leftovers(&mut threads, &mem, stubs_before, &mut out)?;

    let maps = read_maps(pid)?;
    let objects = loaded_objects(pid)?;
    let mut unwinder = safety::build_unwinder(&mem, &maps, &objects, &all);
    // Newest first: a region stacked on another is undone before the one below it.
    let mut order: Vec<&RegionCheck> = checks.iter().collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.region.seq));
    for c in order {
        let r = &c.region;
        let mut report = RepairReport {
            pid: pid.0,
            region: r.addr,
            patch_id: r.patch_id.clone(),
            build_id: r.build_id.clone(),
            state: r.state,
            action: c.verdict.clone(),
            writes: 0,
            unmapped: false,
        };
        let region_busy = Busy {
            range: r.code_range(),
            name: format!("patch {} code", r.patch_id),
        };
        let (writes, busy, target) = match &c.verdict {
            Verdict::Stuck(_) => {
                out.regions.push(report);
                continue;
            }
            Verdict::Complete => (Vec::new(), Vec::new(), RegionState::Applied),
            Verdict::RollBack | Verdict::FinishRemoval => {
                // Undo exactly the writes that are live now (re-read: a region
                // repaired before this one may have changed shared places).
                let mut w = Vec::new();
                for (addr, new, old) in apply_writes(r) {
                    if mem.read_vec(addr, new.len()).ok().as_ref() == Some(&new) {
                        w.push((addr, old, new));
                    }
                }
                let mut busy = vec![region_busy];
                busy.extend(r.hunks.iter().map(|h| Busy {
                    range: h.saddr..h.saddr + h.slen as u64,
                    name: format!("{} (patched)", h.name),
                }));
                // New code that ran may have left pointers into the region.
                let used = c.verdict == Verdict::FinishRemoval || c.writes_live > 0;
                let to = if used {
                    RegionState::Retired
                } else {
                    RegionState::Prepared
                };
                (w, busy, to)
            }
            Verdict::Unmap => (Vec::new(), vec![region_busy], RegionState::Prepared),
        };
        report.writes = writes.len();
        let journal = [(r.addr, target)];
        crate::commit::commit_journal(
            &mut threads,
            &mem,
            &maps,
            &mut unwinder,
            &busy,
            &writes,
            &journal,
            "repair",
            opts,
        )?;
        if target == RegionState::Prepared {
            crate::rsyscall::syscall(
                &mut threads,
                "munmap",
                SYS_MUNMAP,
                [r.addr, r.total_len, 0, 0, 0, 0],
            )?;
            report.unmapped = true;
        }
        out.regions.push(report);
    }
    threads.detach_all()?;
    // Retired regions go too once nothing points into them.
    if let Ok(r) = crate::reclaim(pid, opts) {
        for rep in &mut out.regions {
            rep.unmapped |= r.unmapped.contains(&rep.region);
        }
    }
    Ok(out)
}
