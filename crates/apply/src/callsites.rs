//! Call-site retargeting: the direct `call rel32` instructions of the patched object
//! that call a replaced function are made to call the new body, so a patched
//! function costs no more per call than the original (the entry jump stays for
//! function pointers, PLT calls from other objects and tail jumps).
//!
//! Finding the sites: every 0xe8 byte of the object's executable segments whose
//! rel32 lands on a replaced function is only a candidate; it counts when decoding
//! the function that contains it, from that function's start (symbol table, else
//! `.eh_frame` FDEs), lands on an instruction boundary there and that instruction is
//! a `call rel32` to the same target. Candidates outside every known function are
//! dropped, and with neither a symbol table nor FDEs nothing is retargeted. The
//! candidate list and the decoded results are cached per build-id (in link-time
//! addresses), so `-p all` over many processes of one binary finds them once.
//!
//! Sites inside a function that is being replaced (by this patch or an applied one)
//! are left alone: that code is dead once the entry jump is in (no thread may be
//! inside it at commit), and a site in the first bytes of such a function would
//! collide with its entry jump.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use iced_x86::{Code, Decoder, DecoderOptions};
use object::read::elf::{FileHeader, ProgramHeader};
use object::{elf, LittleEndian as LE};

use livecare_process::{LoadedObject, RemoteMemory};

use crate::prepare::ObjectView;
use crate::region::{CallSite, Hunk, RegionHeader, CALL_SITE_LEN};
use crate::Error;

/// Length of `call rel32`.
const CALL_LEN: u64 = 5;
/// Its opcode.
const CALL_OPCODE: u8 = 0xe8;
/// Page size (copy-on-write granularity, read span size).
const PAGE: u64 = 4096;

/// What is known about one object file's direct calls (link-time addresses).
struct Index {
    /// Executable PT_LOAD segments: (vaddr, file offset, file size).
    segs: Vec<(u64, u64, u64)>,
    /// (target, site) of every 0xe8 byte whose rel32 lands in an executable segment,
    /// sorted by target.
    candidates: Vec<(u64, u64)>,
    /// Function extents (start, len) from the symbol table, sorted by start.
    sym_funcs: Vec<(u64, u64)>,
    /// Function extents (start, len) from `.eh_frame`, sorted by start.
    fde_funcs: Vec<(u64, u64)>,
    /// Decoded result per target: the confirmed call sites.
    confirmed: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

/// The indexes built so far, by build-id.
fn cache() -> &'static Mutex<HashMap<String, Arc<Index>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Index>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Executable PT_LOAD segments of an ELF file.
fn exec_segments(data: &[u8]) -> Vec<(u64, u64, u64)> {
    let Ok(hdr) = elf::FileHeader64::<LE>::parse(data) else {
        return Vec::new();
    };
    let Ok(e) = hdr.endian() else {
        return Vec::new();
    };
    let Ok(phs) = hdr.program_headers(e, data) else {
        return Vec::new();
    };
    phs.iter()
        .filter(|ph| ph.p_type(e) == elf::PT_LOAD && ph.p_flags(e) & elf::PF_X != 0)
        .map(|ph| (ph.p_vaddr(e), ph.p_offset(e), ph.p_filesz(e)))
        .filter(|&(_, off, sz)| {
            off.checked_add(sz)
                .is_some_and(|end| end <= data.len() as u64)
        })
        .collect()
}

impl Index {
    fn build(obj: &LoadedObject, view: &ObjectView) -> Index {
        let data: &[u8] = &obj.data;
        let bias = obj.load_bias;
        let segs = exec_segments(data);
        let in_exec = |a: u64| segs.iter().any(|&(v, _, sz)| a >= v && a < v + sz);
        let mut candidates = Vec::new();
        for &(vaddr, off, sz) in &segs {
            let bytes = &data[off as usize..(off + sz) as usize];
            for (i, w) in bytes.windows(CALL_LEN as usize).enumerate() {
                if w[0] != CALL_OPCODE {
                    continue;
                }
                let rel = i32::from_le_bytes([w[1], w[2], w[3], w[4]]);
                let site = vaddr + i as u64;
                let target = (site + CALL_LEN).wrapping_add(rel as i64 as u64);
                if in_exec(target) {
                    candidates.push((target, site));
                }
            }
        }
        candidates.sort_unstable();
        let extents = |m: &mut dyn Iterator<Item = (u64, u64)>| {
            let mut v: Vec<(u64, u64)> = m
                .filter(|&(_, len)| len > 0)
                .map(|(a, len)| (a.wrapping_sub(bias), len))
                .collect();
            v.sort_unstable();
            v
        };
        let sym_funcs = if view.has_symtab {
            extents(&mut view.funcs_by_addr.iter().map(|(a, (_, len))| (*a, *len)))
        } else {
            Vec::new()
        };
        let fde_funcs = extents(&mut view.fdes.iter().map(|(a, len)| (*a, *len)));
        Index {
            segs,
            candidates,
            sym_funcs,
            fde_funcs,
            confirmed: Mutex::new(HashMap::new()),
        }
    }

    /// The file bytes of `range` (link addresses), if inside one executable segment.
    fn bytes<'d>(&self, data: &'d [u8], range: Range<u64>) -> Option<&'d [u8]> {
        let &(v, off, _) = self
            .segs
            .iter()
            .find(|&&(v, _, sz)| range.start >= v && range.end <= v + sz)?;
        data.get((off + range.start - v) as usize..(off + range.end - v) as usize)
    }

    /// The known function that contains `[site, site + 5)`: symbol table first, then
    /// FDEs. A few entries back are checked too, for aliases and nested symbols.
    fn function_of(&self, site: u64) -> Option<(u64, u64)> {
        for funcs in [&self.sym_funcs, &self.fde_funcs] {
            let n = funcs.partition_point(|&(s, _)| s <= site);
            let found = funcs[..n]
                .iter()
                .rev()
                .take(4)
                .find(|&&(s, len)| site + CALL_LEN <= s + len);
            if let Some(&f) = found {
                return Some(f);
            }
        }
        None
    }

    /// Sites that really are `call rel32` to `target` (see the module doc).
    fn sites_calling(&self, data: &[u8], target: u64) -> Arc<Vec<u64>> {
        if let Some(v) = self
            .confirmed
            .lock()
            .ok()
            .and_then(|c| c.get(&target).cloned())
        {
            return v;
        }
        let lo = self.candidates.partition_point(|&(t, _)| t < target);
        let hi = self.candidates.partition_point(|&(t, _)| t <= target);
        // Group the candidates by containing function, so each is decoded once.
        let mut by_func: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
        for &(_, site) in &self.candidates[lo..hi] {
            if let Some(f) = self.function_of(site) {
                by_func.entry(f).or_default().push(site);
            }
        }
        let mut out = Vec::new();
        for ((start, len), mut sites) in by_func {
            let Some(code) = self.bytes(data, start..start + len) else {
                continue;
            };
            sites.sort_unstable();
            let mut want = sites.iter().peekable();
            let mut dec = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
            while dec.can_decode() {
                let Some(&&site) = want.peek() else {
                    break;
                };
                let ins = dec.decode();
                if ins.is_invalid() {
                    break; // not code (or not code we understand): trust nothing after
                }
                // Prefixes (bnd, notrack) come before the opcode: the call ends at
                // site + 5 and its opcode byte is the 0xe8 at `site`.
                if ins.next_ip() == site + CALL_LEN
                    && ins.code() == Code::Call_rel32_64
                    && ins.near_branch64() == target
                {
                    out.push(site);
                }
                while want.peek().is_some_and(|&&s| s + CALL_LEN <= ins.next_ip()) {
                    want.next();
                }
            }
        }
        out.sort_unstable();
        let v = Arc::new(out);
        if let Ok(mut c) = self.confirmed.lock() {
            c.insert(target, v.clone());
        }
        v
    }
}

/// The index of `obj`, built on first use and cached by build-id.
fn index_of(obj: &LoadedObject, view: &ObjectView) -> Arc<Index> {
    let key = obj.build_id.clone();
    if let Some(k) = &key {
        if let Some(i) = cache().lock().ok().and_then(|c| c.get(k).cloned()) {
            return i;
        }
    }
    let t = Instant::now();
    let idx = Arc::new(Index::build(obj, view));
    tracing::debug!(
        object = %obj.path,
        candidates = idx.candidates.len(),
        functions = idx.sym_funcs.len().max(idx.fde_funcs.len()),
        us = t.elapsed().as_micros() as u64,
        "call-site index built"
    );
    if let (Some(k), Ok(mut c)) = (key, cache().lock()) {
        c.insert(k, idx.clone());
    }
    idx
}

/// Call sites to retarget, per replaced function's original address (runtime).
#[derive(Debug, Default)]
pub(crate) struct Plan {
    sites: HashMap<u64, Vec<u64>>,
}

impl Plan {
    /// Header bytes the sites' undo records need (with alignment slack).
    pub(crate) fn header_bytes(&self) -> u64 {
        let n: usize = self.sites.values().map(Vec::len).sum();
        (n * CALL_SITE_LEN + 4) as u64
    }
}

/// Finds the direct calls in `obj` to each `(daddr, dlen)` of `hunks` (runtime
/// addresses), leaving out sites inside any function this patch or an applied patch
/// of the same object (`existing`) replaces.
pub(crate) fn plan(
    obj: &LoadedObject,
    view: &ObjectView,
    hunks: &[(u64, u32)],
    existing: &[RegionHeader],
) -> Plan {
    let mut plan = Plan::default();
    if hunks.is_empty() || (!view.has_symtab && view.fdes.is_empty()) {
        return plan;
    }
    let t = Instant::now();
    let idx = index_of(obj, view);
    let bias = obj.load_bias;
    let bid = obj.build_id.as_deref().unwrap_or_default();
    let dead: Vec<Range<u64>> = hunks
        .iter()
        .copied()
        .chain(
            existing
                .iter()
                .filter(|r| r.build_id == bid)
                .flat_map(|r| r.hunks.iter().map(|h| (h.daddr, h.dlen))),
        )
        .map(|(a, len)| a..a + u64::from(len).max(CALL_LEN))
        .collect();
    for &(daddr, _) in hunks {
        let sites = idx.sites_calling(&obj.data, daddr.wrapping_sub(bias));
        let live: Vec<u64> = sites
            .iter()
            .map(|s| s.wrapping_add(bias))
            .filter(|&s| !dead.iter().any(|d| s < d.end && d.start < s + CALL_LEN))
            .collect();
        if !live.is_empty() {
            plan.sites.insert(daddr, live);
        }
    }
    tracing::debug!(
        sites = plan.sites.values().map(Vec::len).sum::<usize>(),
        us = t.elapsed().as_micros() as u64,
        "call sites found"
    );
    plan
}

/// The 5 bytes of `call target` at `site`, if the target is within rel32 reach.
fn call_bytes(site: u64, target: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(target.wrapping_sub(site + CALL_LEN) as i64).ok()?;
    Some(encode(rel))
}

fn encode(rel: i32) -> [u8; 5] {
    let r = rel.to_le_bytes();
    [CALL_OPCODE, r[0], r[1], r[2], r[3]]
}

/// Checks each planned site of `hunks` in the target's memory and records it in its
/// hunk: it must still call the original function, or (stacked patches) the new
/// body of the applied patch that replaced the same function last. A site showing
/// anything else is left alone (the entry jump still covers it). Also takes the
/// copy-on-write of every page with a site now, by rewriting bytes it already has,
/// so that does not happen inside the stop.
pub(crate) fn prepare(
    mem: &RemoteMemory,
    plan: &Plan,
    hunks: &mut [Hunk],
    existing: &[RegionHeader],
) -> Result<(), Error> {
    let mut touched_pages = HashSet::new();
    for h in hunks.iter_mut() {
        let Some(sites) = plan.sites.get(&h.daddr) else {
            continue;
        };
        let below = existing
            .iter()
            .rev()
            .flat_map(|r| r.hunks.iter())
            .find(|x| x.daddr == h.daddr)
            .map(|x| x.saddr);
        // Sites are sorted: read them in page-sized spans, not one by one.
        let mut i = 0;
        while i < sites.len() {
            let start = sites[i];
            let n = sites[i..].partition_point(|&s| s + CALL_LEN <= start + PAGE);
            let end = sites[i + n - 1] + CALL_LEN;
            let live = mem.read_vec(start, (end - start) as usize)?;
            for &site in &sites[i..i + n] {
                let o = (site - start) as usize;
                let now = &live[o..o + CALL_LEN as usize];
                let was_ours = [Some(h.daddr), below]
                    .into_iter()
                    .flatten()
                    .any(|t| call_bytes(site, t).is_some_and(|b| b[..] == *now));
                if !was_ours || call_bytes(site, h.saddr).is_none() {
                    tracing::debug!(
                        site,
                        function = %h.name,
                        "call site changed by someone else or new body out of reach; not retargeted"
                    );
                    continue;
                }
                let pages = [site / PAGE, (site + CALL_LEN - 1) / PAGE];
                if !pages.iter().all(|p| touched_pages.contains(p)) {
                    mem.write(site, now)?;
                    touched_pages.extend(pages);
                }
                h.call_sites.push(CallSite {
                    addr: site,
                    old_rel: i32::from_le_bytes([now[1], now[2], now[3], now[4]]),
                });
            }
            i += n;
        }
    }
    Ok(())
}

/// The commit writes that retarget the recorded sites: `(addr, new, expected old)`.
pub(crate) fn retarget_writes(hunks: &[Hunk]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    hunks
        .iter()
        .flat_map(|h| {
            h.call_sites.iter().filter_map(move |c| {
                let new = call_bytes(c.addr, h.saddr)?;
                Some((c.addr, new.to_vec(), encode(c.old_rel).to_vec()))
            })
        })
        .collect()
}

/// The commit writes that put the recorded sites back: `(addr, old, expected new)`.
pub(crate) fn restore_writes(hunks: &[Hunk]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    retarget_writes(hunks)
        .into_iter()
        .map(|(a, new, old)| (a, old, new))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;
    use testkit::{Link, Scratch};

    /// `obj` as if loaded at its link addresses.
    fn object(path: &Path) -> LoadedObject {
        LoadedObject {
            path: path.display().to_string(),
            build_id: None, // not cached: each test sees its own file
            load_bias: 0,
            ranges: std::iter::once(0..u64::MAX / 2).collect(),
            kind: livecare_process::ElfKind::Executable,
            map_file: String::new(),
            data: livecare_process::Bytes::from(std::fs::read(path).unwrap()),
        }
    }

    /// `call` sites to `<target>` as objdump decodes them, with the symbol each lies in.
    fn objdump_calls(path: &Path, target: &str) -> Vec<(u64, String)> {
        let out = Command::new("objdump")
            .arg("-d")
            .arg(path)
            .output()
            .unwrap();
        let mut current = String::new();
        let mut out_sites = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
                current = name.1.to_string();
            } else if line.contains("call") && line.ends_with(&format!("<{target}>")) {
                let addr = line.trim().split(':').next().unwrap();
                out_sites.push((u64::from_str_radix(addr, 16).unwrap(), current.clone()));
            }
        }
        out_sites
    }

    fn build_fixture(s: &Scratch) -> std::path::PathBuf {
        let src = testkit::fixture_dir("apply-callsites").join("orig.c");
        testkit::gcc(&[&src], &s.join("prog"), Link::Pie, &["-O2", "-g"]).unwrap()
    }

    #[test]
    fn finds_the_direct_calls_objdump_sees_in_functions_and_skips_look_alike_bytes() {
        let s = Scratch::new().unwrap();
        let exe = build_fixture(&s);
        let obj = object(&exe);
        let view = ObjectView::new(&obj).unwrap();
        let value = view.symtab["value"];
        let idx = Index::build(&obj, &view);
        let plan = plan(&obj, &view, &[(value.addr, value.size as u32)], &[]);
        let found = plan.sites.get(&value.addr).cloned().unwrap_or_default();

        let oracle = objdump_calls(&exe, "value");
        let want: Vec<u64> = oracle
            .iter()
            .filter(|(_, f)| f == "main" || f == "twice")
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(want.len(), 3, "fixture changed? {oracle:?}");
        assert_eq!(found, want);

        // The look-alikes were candidates, so the decoding is what rejected them.
        let stray = view.symtab["stray"].addr;
        let decoy_imm = view.symtab["decoy"].addr..view.symtab["decoy"].addr + 64;
        let cands: Vec<u64> = idx
            .candidates
            .iter()
            .filter(|(t, _)| *t == value.addr)
            .map(|(_, s)| *s)
            .collect();
        assert!(cands.contains(&stray), "{cands:x?}");
        assert!(cands.iter().any(|c| decoy_imm.contains(c)), "{cands:x?}");
        assert!(!found.contains(&stray));
        assert!(!found.iter().any(|c| decoy_imm.contains(c)));
    }

    #[test]
    fn a_stripped_object_is_decoded_from_its_fde_starts() {
        let s = Scratch::new().unwrap();
        let exe = build_fixture(&s);
        let stripped = s.join("prog.stripped");
        testkit::run_ok(Command::new("strip").arg(&exe).arg("-o").arg(&stripped)).unwrap();
        let full = ObjectView::new(&object(&exe)).unwrap();
        let value = full.symtab["value"];
        let obj = object(&stripped);
        let view = ObjectView::new(&obj).unwrap();
        assert!(!view.has_symtab && !view.fdes.is_empty());
        let plan = plan(&obj, &view, &[(value.addr, value.size as u32)], &[]);
        let want: Vec<u64> = objdump_calls(&exe, "value")
            .iter()
            .filter(|(_, f)| f == "main" || f == "twice")
            .map(|(a, _)| *a)
            .collect();
        assert_eq!(plan.sites.get(&value.addr), Some(&want));
    }

    #[test]
    fn sites_inside_replaced_functions_are_left_alone() {
        let s = Scratch::new().unwrap();
        let exe = build_fixture(&s);
        let obj = object(&exe);
        let view = ObjectView::new(&obj).unwrap();
        let (value, twice) = (view.symtab["value"], view.symtab["twice"]);
        // Replacing `twice` too: its two calls to `value` are dead code after the patch.
        let plan = plan(
            &obj,
            &view,
            &[
                (value.addr, value.size as u32),
                (twice.addr, twice.size as u32),
            ],
            &[],
        );
        let sites = &plan.sites[&value.addr];
        assert_eq!(sites.len(), 1, "{sites:x?}");
        assert!(!(twice.addr..twice.addr + twice.size).contains(&sites[0]));
        // main's call to `twice` is retargeted too; one record each.
        assert_eq!(plan.sites[&twice.addr].len(), 1);
        assert_eq!(plan.header_bytes(), (2 * CALL_SITE_LEN + 4) as u64);
    }

    #[test]
    fn restore_writes_undo_retarget_writes() {
        let h = Hunk {
            daddr: 0x1000,
            saddr: 0x4000_0000,
            dlen: 16,
            slen: 16,
            saved: [0; 8],
            name: "f".into(),
            call_sites: vec![CallSite {
                addr: 0x2000,
                old_rel: 0x1000 - 0x2005,
            }],
        };
        let w = retarget_writes(std::slice::from_ref(&h));
        assert_eq!(w.len(), 1);
        let (addr, new, old) = &w[0];
        assert_eq!(*addr, 0x2000);
        assert_eq!(old[..], call_bytes(0x2000, 0x1000).unwrap());
        assert_eq!(new[..], call_bytes(0x2000, 0x4000_0000).unwrap());
        let r = restore_writes(std::slice::from_ref(&h));
        assert_eq!(r, vec![(0x2000, old.clone(), new.clone())]);
    }

    /// Cost on a large object: `cargo test -p livecare-apply -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn index_cost_on_libc() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("libc.so"))
            .unwrap()
            .to_string();
        let obj = object(Path::new(&libc));
        let t = Instant::now();
        let view = ObjectView::new(&obj).unwrap();
        let t_view = t.elapsed();
        let t = Instant::now();
        let idx = Index::build(&obj, &view);
        let t_index = t.elapsed();
        // The most called target, then a hundred more, decoded.
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for (t, _) in &idx.candidates {
            *counts.entry(*t).or_default() += 1;
        }
        let mut by_count: Vec<(usize, u64)> = counts.into_iter().map(|(t, n)| (n, t)).collect();
        by_count.sort_unstable_by(|a, b| b.cmp(a));
        let t = Instant::now();
        let top = idx.sites_calling(&obj.data, by_count[0].1);
        let t_top = t.elapsed();
        let t = Instant::now();
        let mut total = 0;
        for &(_, target) in by_count.iter().skip(1).take(100) {
            total += idx.sites_calling(&obj.data, target).len();
        }
        let t_100 = t.elapsed();
        eprintln!(
            "{libc}: {} bytes, view {t_view:?}; index {t_index:?} ({} candidates, {} FDE functions); \
             top target {:#x}: {} candidates -> {} sites in {t_top:?}; next 100 targets: {total} sites in {t_100:?}",
            obj.data.len(),
            idx.candidates.len(),
            idx.fde_funcs.len(),
            by_count[0].1,
            by_count[0].0,
            top.len()
        );
        assert!(!top.is_empty());
    }
}
