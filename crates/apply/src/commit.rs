//! The commit: the one stop in which every thread is held, checked and the code written.
//!
//! Separate from the entry points because everything here is paid for in pause time,
//! and because the journal that makes a killed livecare harmless is kept here.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use livecare_process::{LoadedObject, MapEntry, RemoteMemory, ThreadSet};

use crate::arch::{Native, PatchArch};
use crate::prepare::{self, ObjectView, PatchElf};
use crate::safety::{self, Busy};
use crate::{
    callsites, fault, region, trampoline, unwind, wait_for_memory_sharers, Error, Hunk, Options,
    Patch, RegionHeader, RegionState,
};

#[allow(clippy::too_many_arguments)]
pub(crate) fn fill_and_commit(
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
        patch_id: patch.id(),
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
pub(crate) fn commit(
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
pub(crate) fn commit_journal(
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
    // Its stops (every attempt's) are the commit's in the `--json` reports; the
    // caller's label is back once it returns.
    let label = std::mem::replace(&mut threads.watch.label, "commit");
    let res = commit_stops(
        threads, mem, maps, unwinder, busy, writes, journal, action, opts, &spans,
    );
    threads.watch.label = label;
    res
}

/// [`commit_journal`] once the spans to write are known.
#[allow(clippy::too_many_arguments)]
fn commit_stops(
    threads: &mut ThreadSet,
    mem: &RemoteMemory,
    maps: &[MapEntry],
    unwinder: &mut unwind::Unwinder,
    busy: &[Busy],
    writes: &[(u64, Vec<u8>, Vec<u8>)],
    journal: &[(u64, RegionState)],
    action: &'static str,
    opts: &Options,
    spans: &[WriteSpan],
) -> Result<(Duration, u32), Error> {
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
        spans,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
