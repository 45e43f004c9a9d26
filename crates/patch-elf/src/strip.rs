//! `--strip`: keep only what the patch needs, turn every other section into NOBITS.

use std::collections::{BTreeMap, HashSet};

use object::build::elf::{Builder, Relocation, SectionData, SectionId};
use object::build::Id;
use object::elf;

use crate::{build_err, is_patch_section, read_builder, write_builder, Error};

/// Whether a section of the linked patched binary keeps its bytes.
fn keeps_bytes(name: &[u8], data: &SectionData<'_>) -> bool {
    is_patch_section(name)
        || name == b".eh_frame"
        || matches!(
            data,
            SectionData::Symbol
                | SectionData::String
                | SectionData::SectionString
                | SectionData::SymbolSectionIndex
        )
}

pub(crate) fn strip(input: &[u8]) -> Result<Vec<u8>, Error> {
    let mut b: Builder<'_> = read_builder(input, "patched")?;

    let mut keep: HashSet<usize> = b
        .sections
        .iter()
        .filter(|s| keeps_bytes(&s.name, &s.data))
        .map(|s| s.id().index())
        .collect();
    // A relocation section survives with the section it applies to.
    let relas: Vec<usize> = b
        .sections
        .iter()
        .filter(|s| matches!(s.data, SectionData::Relocation(_)))
        .filter(|s| s.sh_info_section.is_some_and(|t| keep.contains(&t.index())))
        .map(|s| s.id().index())
        .collect();
    keep.extend(relas);
    if !b
        .sections
        .iter()
        .any(|s| keep.contains(&s.id().index()) && s.name.starts_with(b".kpatch.info"))
    {
        return Err(Error::NoPatchInfo);
    }
    // Without `-Wl,-q` the linker drops the relocations the applier needs.
    let info_has_relocs = b.sections.iter().any(|s| {
        matches!(&s.data, SectionData::Relocation(r) if !r.is_empty())
            && s.sh_info_section
                .is_some_and(|t| b.sections.get(t).name.starts_with(b".kpatch.info"))
    });
    if !info_has_relocs {
        return Err(Error::NoRelocations);
    }

    keep_patch_fdes_only(&mut b);

    for s in b.sections.iter_mut() {
        if keep.contains(&s.id().index()) {
            continue;
        }
        let size = s.sh_size.max(match &s.data {
            SectionData::Data(d) | SectionData::Note(d) => d.len() as u64,
            SectionData::UninitializedData(n) => *n,
            _ => 0,
        });
        if matches!(s.sh_type, elf::SHT_RELA | elf::SHT_REL) {
            // binutils 2.40 `strip --strip-unneeded` revives a NOBITS `.rela*` that still
            // carries SHF_INFO_LINK, or still links a symbol table and a target section,
            // as a live relocation section full of R_X86_64_NONE at offset 0.
            s.sh_flags &= !u64::from(elf::SHF_INFO_LINK);
            s.sh_flags |= u64::from(elf::SHF_ALLOC);
            s.sh_info_section = None;
            s.sh_info = 0;
            s.sh_link_section = None;
            s.sh_entsize = 0;
        }
        s.sh_type = elf::SHT_NOBITS;
        s.data = SectionData::UninitializedData(size);
    }

    // The dynamic tables became placeholders; their builder-side contents must go too.
    for sym in b.dynamic_symbols.iter_mut() {
        sym.delete = true;
    }
    for v in b.versions.iter_mut() {
        v.delete = true;
    }
    for f in b.version_files.iter_mut() {
        f.delete = true;
    }
    b.version_base = None;
    // Without program headers the writer packs sections freely, so file offsets shrink.
    for seg in b.segments.iter_mut() {
        seg.delete = true;
    }
    b.header.e_phoff = 0;
    write_builder(b).map_err(build_err)
}

/// Cuts the linked `.eh_frame` down to the FDEs that cover patch code (their pc_begin
/// is relocated against a `.kpatch*` section) and the CIEs they use, with their
/// relocations: the applier unwinds through patch code only (the object's own
/// `.eh_frame` covers the rest), and the program's whole table made a one-function
/// patch of redis some 370 KB. FDEs whose target ld dropped (`R_X86_64_NONE`) go too.
/// The format is unchanged (entries in their order, a zero terminator), so LibCare's
/// and LibcarePlus' loaders read it as before. Left whole when it is not plain
/// 32-bit-length CFI with relocations.
fn keep_patch_fdes_only(b: &mut Builder<'_>) {
    let Some(eh) = b
        .sections
        .iter()
        .find(|s| s.name.as_slice() == b".eh_frame")
        .map(|s| s.id())
    else {
        return;
    };
    let (addr, data) = match &b.sections.get(eh).data {
        SectionData::Data(d) => (b.sections.get(eh).sh_addr, d.to_vec()),
        _ => return,
    };
    let relas: Vec<SectionId> = b
        .sections
        .iter()
        .filter(|s| matches!(s.data, SectionData::Relocation(_)))
        .filter(|s| s.sh_info_section == Some(eh))
        .map(|s| s.id())
        .collect();
    let [rela] = relas[..] else {
        return;
    };
    let SectionData::Relocation(relocs) = &b.sections.get(rela).data else {
        return;
    };
    let patch_code = |r: &Relocation| -> bool {
        r.symbol
            .and_then(|sym| b.symbols.get(sym).section)
            .is_some_and(|sec| {
                let s = b.sections.get(sec);
                is_patch_section(&s.name) && s.sh_flags & u64::from(elf::SHF_EXECINSTR) != 0
            })
    };
    // Walk the entries: (offset, total length, CIE offset for an FDE).
    let rd32 = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            data.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let mut entries: Vec<(usize, usize, Option<usize>)> = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let Some(len) = rd32(off) else { return };
        if len == 0 {
            // A terminator (ld keeps crtend's at the end): skip it; one ends the output.
            off += 4;
            continue;
        }
        if len == u32::MAX {
            return; // 64-bit DWARF CFI: not produced by gcc on x86-64; leave it alone.
        }
        let total = 4 + len as usize;
        let Some(id) = rd32(off + 4) else { return };
        if off + total > data.len() || total < 8 {
            return;
        }
        let cie = if id == 0 {
            None
        } else {
            match (off + 4).checked_sub(id as usize) {
                Some(c) => Some(c),
                None => return,
            }
        };
        entries.push((off, total, cie));
        off += total;
    }
    // An FDE covers patch code when the relocation of its pc_begin (right after the
    // CIE pointer) is against a patch code section.
    let mut keep: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    for &(o, _, cie) in &entries {
        let Some(cie) = cie else { continue };
        let pc_begin = addr + o as u64 + 8;
        if relocs
            .iter()
            .any(|r| r.r_offset == pc_begin && patch_code(r))
        {
            if !entries.iter().any(|&(c, _, k)| c == cie && k.is_none()) {
                return; // an FDE pointing at no CIE: not ours to judge
            }
            keep.insert(o);
            keep.insert(cie);
        }
    }
    // New offsets, in the old order.
    let mut moved: BTreeMap<usize, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for &(o, t, cie) in &entries {
        if !keep.contains(&o) {
            continue;
        }
        let n = out.len();
        moved.insert(o, n);
        out.extend_from_slice(&data[o..o + t]);
        if let Some(cie) = cie {
            let ptr = (n + 4 - moved[&cie]) as u32;
            out[n + 4..n + 8].copy_from_slice(&ptr.to_le_bytes());
        }
    }
    out.extend_from_slice(&[0; 4]);
    let mut kept = Vec::new();
    for r in relocs {
        // The entry holding the field (entries are sorted by offset).
        let Some(field) = r.r_offset.checked_sub(addr).map(|f| f as usize) else {
            continue;
        };
        let Some(&(o, t, _)) = entries[..entries.partition_point(|e| e.0 <= field)].last() else {
            continue;
        };
        if field >= o + t || !keep.contains(&o) {
            continue;
        }
        let new_field = moved[&o] + (field - o);
        let mut r = *r;
        r.r_offset = addr + new_field as u64;
        // The linked bytes of a PC-relative field hold its value at the old place.
        let delta = field as i64 - new_field as i64;
        let width = match r.r_type {
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => 4,
            elf::R_X86_64_PC64 => 8,
            _ => 0,
        };
        if let Some(b) = out.get_mut(new_field..new_field + width) {
            if width == 4 {
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                b.copy_from_slice(&v.wrapping_add(delta as i32).to_le_bytes());
            } else if width == 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(b);
                b.copy_from_slice(&i64::from_le_bytes(w).wrapping_add(delta).to_le_bytes());
            }
        }
        kept.push(r);
    }
    let s = b.sections.get_mut(eh);
    s.sh_size = out.len() as u64;
    s.data = SectionData::Data(out.into());
    let r = b.sections.get_mut(rela);
    r.data = SectionData::Relocation(kept);
}
