//! Unpatch: remove applied patches, last-in first-out, in one stop per call.
//!
//! Separate from apply because it needs nothing from the patch file: everything it
//! restores is read back from the region headers in the target.

use livecare_process::{loaded_objects, read_maps, Pid, RemoteMemory, ThreadSet};

use crate::arch::{Native, PatchArch};
use crate::commit::commit_journal;
use crate::safety::{self, Busy};
use crate::{
    callsites, check_pid, fault, find_regions, on_tracer_thread, reclaim_quietly,
    refuse_if_interrupted_in, seize, Error, Options, RegionHeader, RegionState, TargetLock,
};

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
    // into them (after the tracer thread's exit: fenced threads are free again),
    // tried once a few have piled up.
    let gone = reclaim_quietly(pid, opts, crate::reclaim::RECLAIM_AT).unmapped;
    for r in &mut out {
        r.retired = !gone.contains(&r.region);
    }
    Ok(out)
}

/// Removes the regions at `addrs` (newest first) in one stop: every restore of every
/// region is written, or none is. The regions are retired, not unmapped: a thread may
/// still use their data (see [`reclaim`]).
pub(crate) fn unpatch_regions(
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
}
