//! `--strip`: keep only what the patch needs, turn every other section into NOBITS.

use std::collections::HashSet;

use object::build::elf::{Builder, SectionData};
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
