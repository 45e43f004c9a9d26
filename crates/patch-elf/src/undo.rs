//! `--undo-link ORIG PATCH`: turn the linked patch back into a relocatable object.

use object::build::elf::{Builder, SectionData};
use object::elf;

use crate::original::Original;
use crate::{build_err, is_patch_section, read_builder, write_builder, Error};

pub(crate) fn undo_link(orig: &[u8], patch: &[u8]) -> Result<Vec<u8>, Error> {
    let original = Original::parse(orig)?;
    let mut b: Builder<'_> = read_builder(patch, "patch")?;
    if b.header.e_type == elf::ET_REL {
        return Err(Error::AlreadyRelocatable);
    }
    let addr_of = |b: &Builder<'_>, id| b.sections.get(id).sh_addr;

    // In a linked object, STT_TLS values are offsets in the TLS segment, which starts at
    // the first TLS section.
    let tls_start = b
        .sections
        .iter()
        .filter(|s| s.sh_flags & u64::from(elf::SHF_TLS) != 0)
        .map(|s| s.sh_addr)
        .min();

    // Relocation offsets become offsets in the section they patch.
    let relas: Vec<_> = b
        .sections
        .iter()
        .filter(|s| matches!(s.data, SectionData::Relocation(_)))
        .filter_map(|s| Some((s.id(), s.sh_info_section?)))
        .collect();
    for (rela, target) in relas {
        let base = addr_of(&b, target);
        let t = b.sections.get(target);
        let (name, size) = (t.name.to_string(), t.sh_size);
        if let SectionData::Relocation(relocs) = &mut b.sections.get_mut(rela).data {
            for r in relocs.iter_mut() {
                let off = r.r_offset.wrapping_sub(base);
                if r.r_offset < base || off >= size.max(1) {
                    return Err(Error::RelocationOutOfRange {
                        section: name,
                        offset: r.r_offset,
                    });
                }
                r.r_offset = off;
            }
        }
    }

    // Symbol values become offsets in their section. For a symbol that lives in one of
    // the original's sections, the original's own offset is the truth the applier needs.
    let ids: Vec<_> = b.symbols.iter().map(|s| s.id()).collect();
    for id in ids {
        let sym = b.symbols.get(id);
        let Some(section) = sym.section else { continue };
        let sec = b.sections.get(section);
        let (base, sec_name) = (sec.sh_addr, sec.name.to_vec());
        let placeholder =
            !is_patch_section(&sec_name) && matches!(sec.data, SectionData::UninitializedData(_));
        let new_value = match sym.st_type() {
            elf::STT_SECTION => 0,
            elf::STT_TLS => sym
                .st_value
                .wrapping_add(tls_start.unwrap_or(base))
                .wrapping_sub(base),
            _ => {
                let mut v = sym.st_value.wrapping_sub(base);
                if placeholder && sym.st_bind() != elf::STB_LOCAL && !sym.name.is_empty() {
                    if let Some(o) = original.global_symbol(&sym.name) {
                        if o.section.as_bytes() == sec_name.as_slice() && !o.is_tls {
                            if let Some(oaddr) = original.section_addr(&sec_name) {
                                v = o.value.wrapping_sub(oaddr);
                            }
                        }
                    }
                }
                v
            }
        };
        b.symbols.get_mut(id).st_value = new_value;
    }

    // Patch sections load anywhere; placeholders keep the original's link-time address
    // (as LibCare does), so a loader may use either the name or sh_addr + load bias.
    let updates: Vec<_> = b
        .sections
        .iter()
        .map(|s| {
            let placeholder =
                !is_patch_section(&s.name) && matches!(s.data, SectionData::UninitializedData(_));
            let addr = if placeholder && s.sh_flags & u64::from(elf::SHF_ALLOC) != 0 {
                original.section_addr(&s.name).unwrap_or(0)
            } else {
                0
            };
            (s.id(), addr)
        })
        .collect();
    for (id, addr) in updates {
        let s = b.sections.get_mut(id);
        s.sh_addr = addr;
        if s.sh_type == elf::SHT_NOBITS && s.sh_flags & u64::from(elf::SHF_INFO_LINK) != 0 {
            // `strip --strip-unneeded` re-links dropped `.rela*` placeholders to their
            // sections; cut the link so no tool mistakes them for relocations again.
            s.sh_flags &= !u64::from(elf::SHF_INFO_LINK);
            s.sh_info_section = None;
            s.sh_info = 0;
            s.sh_link_section = None;
        }
    }

    drop_unused_placeholders(&mut b);

    b.header.e_type = elf::ET_REL;
    b.header.e_entry = 0;
    b.header.e_phoff = 0;
    for seg in b.segments.iter_mut() {
        seg.delete = true;
    }
    write_builder(b).map_err(build_err)
}

/// Deletes the placeholders nothing in the patch refers to: no symbol lives in them and
/// no kept section links to them. An applier only ever reaches a placeholder through a symbol
/// (its address, by name or `sh_addr`), so the others (`.rela.debug_*`, `.dynsym`,
/// `.comment`, …, tens of them in a real program) are only header bytes, 64 each plus
/// their names. Patch sections, `.eh_frame` and the tables all carry bytes and stay.
fn drop_unused_placeholders(b: &mut Builder<'_>) {
    let is_placeholder = |s: &object::build::elf::Section<'_>| {
        !is_patch_section(&s.name) && matches!(s.data, SectionData::UninitializedData(_))
    };
    let mut used = Vec::new();
    used.extend(b.symbols.iter().filter_map(|s| s.section));
    used.extend(b.dynamic_symbols.iter().filter_map(|s| s.section));
    used.extend(
        b.sections
            .iter()
            .filter(|s| !is_placeholder(s))
            .map(|s| s.id()),
    );
    // What a kept section links to is kept too (to a fixpoint: `.dynsym` → `.dynstr`).
    loop {
        let linked: Vec<_> = b
            .sections
            .iter()
            .filter(|s| used.contains(&s.id()))
            .flat_map(|s| [s.sh_link_section, s.sh_info_section])
            .flatten()
            .filter(|l| !used.contains(l))
            .collect();
        if linked.is_empty() {
            break;
        }
        used.extend(linked);
    }
    for s in b.sections.iter_mut() {
        if is_placeholder(s) && !used.contains(&s.id()) {
            s.delete = true;
        }
    }
}
