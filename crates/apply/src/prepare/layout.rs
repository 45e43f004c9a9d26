//! Layout and relocation: where each patch section goes in the region, what every
//! symbol resolves to in the target, and the relocated region image.
//!
//! Separate from the patch-ELF parse because it is where the patch meets the target:
//! everything here depends on the loaded object and, for relocation, the region base.

use std::collections::HashMap;

use object::read::elf::{FileHeader, SectionHeader, Sym as _};
use object::{elf, LittleEndian as LE};

use livecare_process::LoadedObject;

use super::object_view::{base_name, fde_extents, resolve_tls, ObjSym, ObjectView, TlsMemory};
use super::{align, is_loaded, Hdr, PatchElf, KPATCH_INFO_LEN, PAGE};
use crate::arch::{Native, PatchArch, RelocInput};
use crate::container::Patch;
use crate::region::{Hunk, RegionHeader, SAVED_LEN};
use crate::Error;

/// How a patch symbol resolves.
#[derive(Debug, Clone, Copy)]
pub(super) enum SymVal {
    /// Offset inside the region (patch sections).
    Region(u64),
    /// An absolute address inside the original object (local).
    Local(u64),
    /// An absolute address elsewhere (another library): reached via jump-table entry.
    External(u64),
    /// A TLS variable with its thread-pointer offset.
    Tls(i64),
    /// Absolute value (SHN_ABS).
    Abs(u64),
}

/// A patch laid out and resolved, waiting for a base address.
pub struct Layout {
    /// Total region size (page multiple).
    pub size: u64,
    /// Length of the read+exec part (header, code, read-only data, jump table).
    pub exec_len: u64,
    header_len: u64,
    /// Section index → region offset of loaded sections.
    sec_off: HashMap<usize, u64>,
    syms: Vec<Option<SymVal>>,
    sym_names: Vec<String>,
    /// Jump-table slot per symbol index that needs one.
    slots: HashMap<usize, usize>,
    jt_off: u64,
    info_sec: Option<usize>,
    eh_frame_sec: Option<(usize, u64)>,
}

/// A relocated region image, its hunks (saved bytes not yet filled) and the
/// location and length of the patch's relocated `.eh_frame`, if any.
pub type Relocated = (Vec<u8>, Vec<Hunk>, Option<(u64, u64)>);

/// Where the patch's code lies in the region, and where its functions start.
#[derive(Default)]
struct PatchCode {
    /// (section index, region addresses) of each `.kpatch.text*` section.
    ranges: Vec<(usize, std::ops::Range<u64>)>,
    /// Region addresses where a function of the patch starts.
    starts: std::collections::HashSet<u64>,
}

impl PatchCode {
    /// A hunk's new body must be a whole function of the patch code: the jump written
    /// into the target lands at `saddr`, so anything else executes garbage.
    fn check_new_body(&self, name: &str, saddr: u64, slen: u32) -> Result<(), String> {
        let Some((_, r)) = self.ranges.iter().find(|(_, r)| r.contains(&saddr)) else {
            return Err(format!(
                "new body of {name} at {saddr:#x} is not in the patch's .kpatch.text"
            ));
        };
        if !self.starts.contains(&saddr) {
            return Err(format!(
                "new body of {name} at {saddr:#x} is not the start of a function of the \
                 patch (no FUNC symbol or .eh_frame FDE starts there)"
            ));
        }
        if saddr + u64::from(slen) > r.end {
            return Err(format!(
                "new body of {name} at {saddr:#x} ({slen} bytes) runs past the end of \
                 .kpatch.text at {:#x}",
                r.end
            ));
        }
        Ok(())
    }
}

impl<'a> PatchElf<'a> {
    /// Lays out the region and resolves every symbol that does not depend on it.
    pub fn layout(
        &self,
        patch: &Patch,
        target: &LoadedObject,
        view: &ObjectView,
        objects: &[(LoadedObject, ObjectView)],
        call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
        mem: &TlsMemory<'_>,
    ) -> Result<Layout, Error> {
        let e = LE;
        let bad = |what: String| Error::BadPatch {
            path: patch.source.clone(),
            what,
        };
        let info_sec = self.secs.iter().position(|(n, _)| n == ".kpatch.info");
        let strtab_len = self
            .secs
            .iter()
            .find(|(n, _)| n == ".kpatch.strtab")
            .map(|(_, s)| s.sh_size(e))
            .unwrap_or(0);
        let max_hunks = info_sec
            .map(|i| self.secs[i].1.sh_size(e) as usize / KPATCH_INFO_LEN + 1)
            .unwrap_or(0);
        let header_len =
            RegionHeader::encoded_len(max_hunks, strtab_len as usize + 64 * max_hunks) as u64;

        // Symbols needing a jump-table slot: undefined, TLS, or GOT-relative referenced.
        let mut slots = HashMap::new();
        for r in &self.relocs {
            let sym = self.syms[r.sym].1;
            let needs = sym.st_shndx(e) == elf::SHN_UNDEF && r.sym != 0
                || Native::needs_got(r.r_type)
                || r.r_type == elf::R_X86_64_GOTTPOFF;
            if needs && !slots.contains_key(&r.sym) {
                let n = slots.len();
                slots.insert(r.sym, n);
            }
        }

        // Sections: read+exec part first (after the header), then writable data on its own pages.
        let mut sec_off = HashMap::new();
        let mut off = header_len;
        for pass_writable in [false, true] {
            if pass_writable {
                off = align(off + (slots.len() * Native::JUMP_TABLE_ENTRY) as u64, PAGE);
            }
            for (i, (name, s)) in self.secs.iter().enumerate() {
                if !is_loaded(name, s) {
                    continue;
                }
                let writable = s.sh_flags(e) & elf::SHF_WRITE as u64 != 0;
                if writable != pass_writable {
                    continue;
                }
                off = align(off, s.sh_addralign(e).clamp(1, PAGE));
                sec_off.insert(i, off);
                off += s.sh_size(e);
            }
            if !pass_writable {
                off = align(off, 16);
            }
        }
        // The jump table sits right after the read+exec sections.
        let exec_end_no_jt = {
            let mut m = header_len;
            for (i, o) in &sec_off {
                let s = self.secs[*i].1;
                if s.sh_flags(e) & elf::SHF_WRITE as u64 == 0 {
                    m = m.max(o + s.sh_size(e));
                }
            }
            align(m, 16)
        };
        let jt_off = exec_end_no_jt;
        let exec_len = align(
            jt_off + (slots.len() * Native::JUMP_TABLE_ENTRY) as u64,
            PAGE,
        );
        let size = align(off.max(exec_len), PAGE);

        // Resolve symbols.
        let mut syms = Vec::with_capacity(self.syms.len());
        let mut names = Vec::with_capacity(self.syms.len());
        for (idx, (name, sym)) in self.syms.iter().enumerate() {
            names.push(name.clone());
            if idx == 0 {
                syms.push(None);
                continue;
            }
            let shndx = sym.st_shndx(e);
            let ty = sym.st_type();
            let val = sym.st_value(e);
            let bname = base_name(name);
            let resolved = if shndx == elf::SHN_ABS {
                Some(SymVal::Abs(val))
            } else if shndx == elf::SHN_UNDEF {
                if !slots.contains_key(&idx) && !self.relocs.iter().any(|r| r.sym == idx) {
                    None
                } else {
                    Some(resolve_undefined(bname, view, objects, call_resolver).map_err(bad)?)
                }
            } else if shndx >= elf::SHN_LORESERVE {
                return Err(bad(format!(
                    "symbol {name}: unsupported section index {shndx:#x}"
                )));
            } else if let Some(o) = sec_off.get(&(shndx as usize)) {
                if ty != elf::STT_SECTION {
                    // Same for the patch's own sections: outside them lies other
                    // patch data, the jump table or unmapped memory.
                    let (sname, s) = &self.secs[shndx as usize];
                    let (sec_size, st_size) = (s.sh_size(e), sym.st_size(e));
                    if val.checked_add(st_size).is_none_or(|end| end > sec_size) {
                        return Err(bad(format!(
                            "symbol {name}: st_value {val:#x} st_size {st_size:#x} \
                             lies outside the patch's {sname} (size {sec_size:#x})"
                        )));
                    }
                    // A global the target already defines cannot be new in the patch
                    // (the patched program would not link): its symbol was moved here,
                    // and the patch would use its own copy instead of the target's.
                    let global = sym.st_bind() != elf::STB_LOCAL;
                    let ours = view.symtab.get(bname).or_else(|| view.dynsym.get(bname));
                    if let (true, false, Some(t)) = (global, name.contains('@'), ours) {
                        if t.st_type != elf::STT_TLS && !name.is_empty() {
                            return Err(bad(format!(
                                "symbol {name}: the patch defines it in its own {sname}, but \
                                 {} already defines it at {:#x}: a symbol of the target was \
                                 moved into the patch (st_shndx) or the patch was forged; \
                                 rebuild the patch",
                                target.path, t.addr
                            )));
                        }
                    }
                }
                Some(SymVal::Region(if ty == elf::STT_SECTION {
                    *o
                } else {
                    o + val
                }))
            } else {
                let (sname, _) = &self.secs[shndx as usize];
                if ty == elf::STT_TLS || sname.starts_with(".tbss") || sname.starts_with(".tdata") {
                    Some(resolve_tls(name, ty, sname, target, view, mem).map_err(bad)?)
                } else if name.contains('@') && ty != elf::STT_SECTION {
                    // A versioned import the patched binary copy-relocated into its own
                    // .bss: the original has it only if it imported it too.
                    Some(resolve_undefined(bname, view, objects, call_resolver).map_err(bad)?)
                } else {
                    let base = view.sections.get(sname).ok_or_else(|| {
                        bad(format!(
                            "symbol {name}: section {sname} does not exist in {}",
                            target.path
                        ))
                    })?;
                    if ty != elf::STT_SECTION {
                        // The patch code reads and writes this symbol: it must lie in
                        // the object's section, or the patch corrupts whatever follows.
                        let sec_size = view.section_sizes.get(sname).unwrap_or(0);
                        let st_size = sym.st_size(e);
                        if val.checked_add(st_size).is_none_or(|end| end > sec_size) {
                            return Err(bad(format!(
                                "symbol {name}: st_value {val:#x} st_size {st_size:#x} \
                                 lies outside {sname} of {} (size {sec_size:#x})",
                                target.path
                            )));
                        }
                        // Resolved by name: it must be the target's symbol of that name,
                        // as function entries are checked, or a patch built from another
                        // binary reads and writes whatever lies there.
                        let want = ObjSym {
                            addr: base.wrapping_add(val),
                            size: st_size,
                            st_type: ty,
                        };
                        check_placed_symbol(name, sname, base, want, target, view).map_err(bad)?;
                        if ty == elf::STT_GNU_IFUNC {
                            // The symbol's address is the resolver: the code wants what
                            // it picks, as the original got from ld.so through its PLT.
                            let real =
                                resolve_ifunc(bname, target, &want, call_resolver).map_err(bad)?;
                            syms.push(Some(if target.contains(real) {
                                SymVal::Local(real)
                            } else {
                                SymVal::External(real)
                            }));
                            continue;
                        }
                    }
                    Some(SymVal::Local(if ty == elf::STT_SECTION {
                        base
                    } else {
                        base.wrapping_add(val)
                    }))
                }
            };
            syms.push(resolved);
        }
        let eh_frame_sec = self
            .secs
            .iter()
            .enumerate()
            .find(|(i, (n, _))| {
                (n == ".eh_frame" || n == ".kpatch.eh_frame") && sec_off.contains_key(i)
            })
            .map(|(i, (_, s))| (i, s.sh_size(e)));
        Ok(Layout {
            size,
            exec_len,
            header_len,
            sec_off,
            syms,
            sym_names: names,
            slots,
            jt_off,
            info_sec,
            eh_frame_sec,
        })
    }

    /// Builds the region image at `base`: sections, jump table, relocations; returns
    /// the image (header area left zero) and the hunks (saved bytes not yet filled).
    pub fn relocate(&self, lay: &Layout, base: u64) -> Result<Relocated, String> {
        let e = LE;
        let mut image = vec![0u8; lay.size as usize];
        for (i, o) in &lay.sec_off {
            let s = self.secs[*i].1;
            if s.sh_type(e) == elf::SHT_NOBITS {
                continue;
            }
            let src = &self.data[s.sh_offset(e) as usize..(s.sh_offset(e) + s.sh_size(e)) as usize];
            image[*o as usize..*o as usize + src.len()].copy_from_slice(src);
        }
        let abs = |v: &SymVal| -> (u64, bool) {
            match *v {
                SymVal::Region(o) => (base + o, true),
                SymVal::Local(a) => (a, true),
                SymVal::External(a) => (a, false),
                SymVal::Tls(_) => (0, false),
                SymVal::Abs(a) => (a, true),
            }
        };
        // Jump table: entries jump to (and slots hold) the symbol's address, or the TLS offset.
        for (sym, slot) in &lay.slots {
            let o = (lay.jt_off + (*slot * Native::JUMP_TABLE_ENTRY) as u64) as usize;
            let entry = match lay.syms[*sym] {
                Some(SymVal::Tls(t)) => Native::jump_table_entry(t as u64),
                Some(ref v) => Native::jump_table_entry(abs(v).0),
                None => return Err(format!("symbol {} unresolved", lay.sym_names[*sym])),
            };
            image[o..o + entry.len()].copy_from_slice(&entry);
        }
        for r in &self.relocs {
            let sec_o = lay.sec_off[&r.target_sec];
            let place = (sec_o + r.offset) as usize;
            let val = lay.syms[r.sym].as_ref().ok_or_else(|| {
                format!(
                    "relocation {} at {}+{:#x} against unresolved symbol {} (#{}); \
                     rebuild the patch",
                    Native::reloc_name(r.r_type),
                    self.secs[r.target_sec].0,
                    r.offset,
                    lay.sym_names[r.sym],
                    r.sym
                )
            })?;
            let (s, local) = abs(val);
            let slot_addr = lay.slots.get(&r.sym).map(|n| {
                base + lay.jt_off + (*n * Native::JUMP_TABLE_ENTRY + Native::JUMP_TABLE_SLOT) as u64
            });
            let tpoff = match val {
                SymVal::Tls(t) => Some(*t),
                _ => None,
            };
            let input = RelocInput {
                s,
                a: r.addend,
                p: base + sec_o + r.offset,
                local,
                got: slot_addr,
                tpoff,
                tpoff_slot: if tpoff.is_some() { slot_addr } else { None },
            };
            if Native::is_tls(r.r_type) && tpoff.is_none() {
                return Err(format!(
                    "{} against non-TLS symbol {}",
                    Native::reloc_name(r.r_type),
                    lay.sym_names[r.sym]
                ));
            }
            // Only the target section is writable to the relocation: a field that
            // spills past its end would overwrite the next section.
            let sec_end = (sec_o + self.secs[r.target_sec].1.sh_size(e)) as usize;
            let sec_image = image
                .get_mut(..sec_end)
                .ok_or("section beyond the region")?;
            Native::apply(sec_image, place, r.r_type, &input).map_err(|m| {
                format!(
                    "{} at {}+{:#x} (symbol {}): {m}",
                    Native::reloc_name(r.r_type),
                    self.secs[r.target_sec].0,
                    r.offset,
                    lay.sym_names[r.sym]
                )
            })?;
        }
        // Hunks from the relocated .kpatch.info.
        let code = self.patch_code(lay, base, &image);
        let mut hunks = Vec::new();
        if let Some(i) = lay.info_sec {
            let o = lay
                .sec_off
                .get(&i)
                .copied()
                .ok_or(".kpatch.info not loaded")? as usize;
            let len = self.secs[i].1.sh_size(e) as usize;
            let rd64 =
                |a: usize| u64::from_le_bytes(image[a..a + 8].try_into().unwrap_or_default());
            let rd32 =
                |a: usize| u32::from_le_bytes(image[a..a + 4].try_into().unwrap_or_default());
            let mut p = o;
            while p + KPATCH_INFO_LEN <= o + len {
                let (daddr, saddr) = (rd64(p), rd64(p + 8));
                if daddr == 0 {
                    // A patch linked from several objects carries one zero-terminated
                    // array per object: skip terminators instead of stopping at the first.
                    p += KPATCH_INFO_LEN;
                    continue;
                }
                let (dlen, slen, symstr) = (rd32(p + 16), rd32(p + 20), rd64(p + 24));
                let name = symstr
                    .checked_sub(base)
                    .and_then(|so| image.get(so as usize..))
                    .map(|s| {
                        let end = s.iter().position(|&c| c == 0).unwrap_or(0).min(200);
                        // Printed by patch, info and unpatch: escape what does not print.
                        kpatch_file::printable(&s[..end])
                    })
                    .unwrap_or_default();
                let name = name.strip_suffix(".kpatch").unwrap_or(&name).to_string();
                if (dlen as usize) < Native::JUMP_LEN {
                    return Err(format!(
                        "function {name} is {dlen} bytes, too short for a {}-byte jump",
                        Native::JUMP_LEN
                    ));
                }
                if !(base..base + lay.size).contains(&saddr) {
                    return Err(format!(
                        "new body of {name} at {saddr:#x} is not in the patch"
                    ));
                }
                code.check_new_body(&name, saddr, slen)?;
                hunks.push(Hunk {
                    daddr,
                    saddr,
                    dlen,
                    slen,
                    saved: [0; SAVED_LEN],
                    name,
                    call_sites: Vec::new(),
                });
                p += KPATCH_INFO_LEN;
            }
        }
        if hunks.is_empty() {
            return Err("the patch has no hunks in .kpatch.info".into());
        }
        // One jump per function: a second one would overwrite the first, save the first
        // jump as "original" bytes, and make the patch impossible to remove.
        let mut by_addr: Vec<&Hunk> = hunks.iter().collect();
        by_addr.sort_by_key(|h| h.daddr);
        for w in by_addr.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b.daddr < a.daddr.saturating_add(u64::from(a.dlen)) {
                return Err(format!(
                    "two .kpatch.info records replace overlapping code: {} at {:#x} ({} bytes) \
                     and {} at {:#x} ({} bytes); a patch may replace each function only once, \
                     rebuild the patch",
                    a.name, a.daddr, a.dlen, b.name, b.daddr, b.dlen
                ));
            }
        }
        let eh = lay
            .eh_frame_sec
            .map(|(i, len)| (base + lay.sec_off[&i], len));
        Ok((image, hunks, eh))
    }

    /// The patch's code sections in the region at `base` and the function starts in
    /// them (FUNC symbols, FDEs of the relocated `.eh_frame`, section starts).
    fn patch_code(&self, lay: &Layout, base: u64, image: &[u8]) -> PatchCode {
        let e = LE;
        let mut code = PatchCode::default();
        for (i, (name, s)) in self.secs.iter().enumerate() {
            let is_code = name == ".kpatch.text" || name.starts_with(".kpatch.text.");
            if !is_code || s.sh_flags(e) & elf::SHF_EXECINSTR as u64 == 0 {
                continue;
            }
            let Some(o) = lay.sec_off.get(&i) else {
                continue;
            };
            let start = base + o;
            code.ranges.push((i, start..start + s.sh_size(e)));
            code.starts.insert(start);
        }
        for (_, sym) in &self.syms {
            if sym.st_type() != elf::STT_FUNC {
                continue;
            }
            let shndx = sym.st_shndx(e) as usize;
            if let Some((_, r)) = code.ranges.iter().find(|(i, _)| *i == shndx) {
                if let Some(a) = r.start.checked_add(sym.st_value(e)) {
                    code.starts.insert(a);
                }
            }
        }
        if let Some((i, len)) = lay.eh_frame_sec {
            let o = lay.sec_off[&i];
            if let Some(bytes) = image.get(o as usize..(o + len) as usize) {
                code.starts
                    .extend(fde_extents(bytes, base + o, 0).into_keys());
            }
        }
        code
    }

    /// Length of the header area at the start of the region.
    pub fn header_len(lay: &Layout) -> u64 {
        lay.header_len
    }

    /// The (original address, length) each `.kpatch.info` record names, from the
    /// resolved symbols alone (independent of the region's base), so call sites can
    /// be counted and the header sized before the region is mapped. [`Self::relocate`]
    /// stays the authority on the hunks; this is only used for sizing and lookup.
    pub fn hunk_targets(&self, lay: &Layout) -> Vec<(u64, u32)> {
        let e = LE;
        let Some(i) = lay.info_sec else {
            return Vec::new();
        };
        let s = self.secs[i].1;
        let raw = if s.sh_type(e) == elf::SHT_NOBITS {
            &[][..]
        } else {
            let o = s.sh_offset(e) as usize;
            self.data
                .get(o..o + s.sh_size(e) as usize)
                .unwrap_or_default()
        };
        let rd = |a: usize, n: usize| -> u64 {
            raw.get(a..a + n).map_or(0, |b| {
                let mut w = [0u8; 8];
                w[..n].copy_from_slice(b);
                u64::from_le_bytes(w)
            })
        };
        let mut out = Vec::new();
        for rec in (0..raw.len() / KPATCH_INFO_LEN).map(|k| k * KPATCH_INFO_LEN) {
            let reloc = self.relocs.iter().find(|r| {
                r.target_sec == i && r.offset == rec as u64 && r.r_type == elf::R_X86_64_64
            });
            let daddr = match reloc.map(|r| (lay.syms[r.sym], r.addend)) {
                Some((Some(SymVal::Local(a) | SymVal::Abs(a)), add)) => a.wrapping_add(add as u64),
                Some(_) => continue, // not an address in the object
                None => rd(rec, 8),
            };
            if daddr != 0 {
                out.push((daddr, rd(rec + 16, 4) as u32));
            }
        }
        out
    }
}

impl Layout {
    /// Makes the header area `extra` bytes longer (call-site records, counted only
    /// once the symbols are resolved). If the gap before the first section is too
    /// small, everything after the header moves by whole pages, which keeps every
    /// section's alignment (layout clamps alignments to a page).
    pub fn grow_header(&mut self, extra: u64) {
        let want = align(self.header_len + extra, 16);
        let first = self
            .sec_off
            .values()
            .copied()
            .chain(std::iter::once(self.jt_off))
            .min()
            .unwrap_or(self.jt_off);
        if want > first {
            let shift = align(want - first, PAGE);
            for o in self.sec_off.values_mut() {
                *o += shift;
            }
            for s in self.syms.iter_mut().flatten() {
                if let SymVal::Region(o) = s {
                    *o += shift;
                }
            }
            self.jt_off += shift;
            self.exec_len += shift;
            self.size += shift;
        }
        self.header_len = want;
    }
}

/// Every definition of `name` in the target's `.symtab` (several for a name that is
/// static in more than one file), at runtime addresses. A scan of the whole table: only
/// done when the one definition [`ObjectView::symtab`] keeps does not match.
fn target_definitions(target: &LoadedObject, name: &str) -> Vec<ObjSym> {
    let mut out = Vec::new();
    let data: &[u8] = &target.data;
    let Ok(hdr) = Hdr::parse(data) else {
        return out;
    };
    let Ok(e) = hdr.endian() else { return out };
    let Ok(secs) = hdr.sections(e, data) else {
        return out;
    };
    let Ok(tab) = secs.symbols(e, data, elf::SHT_SYMTAB) else {
        return out;
    };
    for sym in tab.iter() {
        if sym.st_shndx(e) == elf::SHN_UNDEF {
            continue;
        }
        let Ok(n) = tab.symbol_name(e, sym) else {
            continue;
        };
        if std::str::from_utf8(n).is_ok_and(|n| base_name(n) == name) {
            out.push(ObjSym {
                addr: sym.st_value(e).wrapping_add(target.load_bias),
                size: sym.st_size(e),
                st_type: sym.st_type(),
            });
        }
    }
    out
}

fn symbol_type_name(t: u8) -> String {
    match t {
        elf::STT_NOTYPE => "NOTYPE".into(),
        elf::STT_OBJECT => "OBJECT".into(),
        elf::STT_FUNC => "FUNC".into(),
        elf::STT_TLS => "TLS".into(),
        elf::STT_GNU_IFUNC => "IFUNC".into(),
        t => format!("type {t}"),
    }
}

/// Checks a symbol the patch places at `want` in the target's section `sname` (runtime
/// address `base`) against the target's own symbol of that name: same place in the
/// section, same size, same type. Without a `.symtab` the exported symbols are the only
/// reference; a name found in neither cannot be checked.
fn check_placed_symbol(
    name: &str,
    sname: &str,
    base: u64,
    want: ObjSym,
    target: &LoadedObject,
    view: &ObjectView,
) -> Result<(), String> {
    let bname = base_name(name);
    if bname.is_empty() {
        return Ok(()); // nothing to look up; resolved by section alone
    }
    let same = |s: &ObjSym| s.addr == want.addr && s.size == want.size && s.st_type == want.st_type;
    // The definition the tables keep (a global before same-named locals) nearly always
    // is the one; only a mismatch costs a scan for the other definitions.
    let table = if view.has_symtab {
        view.symtab.get(bname)
    } else {
        view.dynsym.get(bname)
    };
    if table.as_ref().is_some_and(same) || (!view.has_symtab && table.is_none()) {
        return Ok(());
    }
    let candidates = if view.has_symtab {
        target_definitions(target, bname)
    } else {
        table.into_iter().collect()
    };
    if candidates.iter().any(same) {
        return Ok(());
    }
    let describe = |s: &ObjSym| {
        let off = s.addr.wrapping_sub(base) as i64;
        format!(
            "{sname}{off:+#x} ({} bytes, {})",
            s.size,
            symbol_type_name(s.st_type)
        )
    };
    let has = if candidates.is_empty() {
        "no symbol of that name".to_string()
    } else {
        let all: Vec<String> = candidates.iter().map(describe).collect();
        format!("it at {}", all.join(", "))
    };
    Err(format!(
        "symbol {name}: the patch expects it at {}, but {} has {has}: the patch was built \
         from another binary (its build-id may have been forged); build the patch from the \
         sources of this binary",
        describe(&want),
        target.path
    ))
}

fn resolve_undefined(
    name: &str,
    view: &ObjectView,
    objects: &[(LoadedObject, ObjectView)],
    call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
) -> Result<SymVal, String> {
    if let Some(s) = view.symtab.get(name).or_else(|| view.dynsym.get(name)) {
        if s.st_type == elf::STT_TLS {
            return Err(format!("TLS symbol {name} referenced as undefined"));
        }
        if s.st_type != elf::STT_GNU_IFUNC {
            return Ok(SymVal::Local(s.addr));
        }
    }
    // The executable first, then libraries in load order, like the dynamic linker.
    let mut order: Vec<&(LoadedObject, ObjectView)> = objects
        .iter()
        .filter(|(o, _)| o.kind == livecare_process::ElfKind::Executable)
        .collect();
    order.extend(
        objects
            .iter()
            .filter(|(o, _)| o.kind != livecare_process::ElfKind::Executable),
    );
    for (o, v) in order {
        let Some(s) = v.dynsym.get(name) else {
            continue;
        };
        if s.st_type == elf::STT_TLS {
            let slot = v.tpoff_slots.get(name);
            return Err(format!(
                "TLS symbol {name} of {} (slot {slot:?}) cannot be imported",
                o.path
            ));
        }
        if s.st_type == elf::STT_GNU_IFUNC {
            return resolve_ifunc(name, o, &s, call_resolver).map(SymVal::External);
        }
        return Ok(SymVal::External(s.addr));
    }
    Err(format!(
        "undefined symbol {name} not found in any loaded object"
    ))
}

/// The implementation IFUNC `name` of `o` (resolver `s`) picks for this CPU: the
/// resolver runs here when livecare has loaded the same object itself, else in the
/// target.
fn resolve_ifunc(
    name: &str,
    o: &LoadedObject,
    s: &ObjSym,
    call_resolver: &mut dyn FnMut(u64) -> Result<u64, Error>,
) -> Result<u64, String> {
    if let Some(real) = crate::ifunc::resolve_locally(name, o, s) {
        return Ok(real);
    }
    call_resolver(s.addr).map_err(|e| format!("IFUNC resolver of {name} in {}: {e}", o.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_body_must_be_a_function_start_inside_kpatch_text() {
        let code = PatchCode {
            ranges: vec![(18, 0x1000..0x1040)],
            starts: [0x1000, 0x1020].into_iter().collect(),
        };
        assert!(code.check_new_body("f", 0x1000, 0x20).is_ok());
        assert!(code.check_new_body("g", 0x1020, 0x20).is_ok());
        let err = |a, l| code.check_new_body("f", a, l).unwrap_err();
        assert!(err(0x1001, 4).contains("not the start of a function"));
        assert!(err(0x0ff0, 4).contains("not in the patch's .kpatch.text"));
        assert!(err(0x1040, 0).contains("not in the patch's .kpatch.text"));
        assert!(err(u64::MAX - 15, 4).contains("not in the patch's .kpatch.text"));
        assert!(err(0x1020, 0x21).contains("runs past the end"));
    }
}
