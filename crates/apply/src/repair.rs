//! Recovery after a livecare that died mid-operation.
//!
//! The region header's state word is the journal (see [`crate::RegionState`]): a
//! region left `Committing` or `Removing` had its code writes cut short, and one left
//! `Prepared` was never committed (or was unpatched but not yet unmapped). [`check`]
//! reads every such region and the live bytes of each of its code writes (function
//! entry jumps, retargeted call sites) and says what [`repair`] would do; [`repair`]
//! does it in a stop like a normal commit: it completes a commit whose writes all
//! landed, rolls back any other, finishes an interrupted removal, and unmaps leftover
//! regions once no thread can execute there. Live bytes matching neither side are
//! left alone and reported.

use livecare_process::arch::x86_64::SYS_MUNMAP;
use livecare_process::{loaded_objects, read_maps, Pid, RemoteMemory, ThreadSet};

use crate::arch::{Native, PatchArch};
use crate::region::{find_regions, RegionHeader, RegionState};
use crate::safety::{self, Busy};
use crate::{callsites, Error, Options};

/// What `repair` does (or would do) with a region that is not cleanly applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Interrupted commit whose code writes all landed: mark it applied.
    Complete,
    /// Interrupted commit: undo the writes that landed, unmap the region.
    RollBack,
    /// Interrupted unpatch: undo the writes still live, unmap the region.
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
        if r.state == RegionState::Applied {
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

/// Brings every region of `pid` that is not cleanly applied to a clean state (see
/// the module doc): seizes the process, undoes trampoline redirects left behind,
/// then per region completes, rolls back, finishes the removal or unmaps, each in a
/// stop with the usual safety check; resumes and detaches.
pub fn repair(pid: Pid, rollback: bool, opts: &Options) -> Result<Repaired, Error> {
    crate::check_pid(pid)?;
    let checks = check(pid, rollback)?;
    let mut out = Repaired {
        pid: pid.0,
        redirects_undone: 0,
        regions: Vec::new(),
    };
    let all = find_regions(pid)?;
    ThreadSet::refuse_stopped(pid)?;
    let mut threads = ThreadSet::seize(pid)?;
    let mem = RemoteMemory::open(pid)?;
    // A dead livecare may have left a thread due to return through a trampoline:
    // send it straight to its return address before any region can go away.
    threads.interrupt_all()?;
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
                (w, busy, RegionState::Prepared)
            }
            Verdict::Unmap => (Vec::new(), vec![region_busy], RegionState::Prepared),
        };
        report.writes = writes.len();
        let journal = [(r.addr, target)];
        crate::commit_journal(
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
    Ok(out)
}
