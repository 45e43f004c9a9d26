//! `--rel-fixup ORIG PATCH`: rewrite the relocations of the kept sections so that the
//! applier can resolve them against the running original object.

use object::build::elf::{Builder, Relocation, SectionData, SectionId, SymbolId};
use object::elf;

use crate::arch::x86_64::{self as arch, Class, GotLoad};
use crate::original::{base_name, Original};
use crate::{build_err, read_builder, write_builder, Error};

/// Where a relocation sits, for error messages.
struct Site {
    r_type: u32,
    section: String,
    offset: u64,
}

impl Site {
    fn unsupported(&self, why: &str) -> Error {
        Error::UnsupportedRelocation {
            r_type: arch::reloc_name(self.r_type),
            section: self.section.clone(),
            offset: self.offset,
            why: why.to_string(),
        }
    }
}

pub(crate) fn rel_fixup(orig: &[u8], patch: &[u8]) -> Result<Vec<u8>, Error> {
    let original = Original::parse(orig)?;
    let mut b: Builder<'_> = read_builder(patch, "patch")?;
    if b.header.e_machine != elf::EM_X86_64 {
        return Err(Error::UnsupportedMachine(b.header.e_machine));
    }

    // Relocation sections whose target still has bytes (after --strip: the .kpatch*
    // sections and .eh_frame).
    let work: Vec<(SectionId, SectionId)> = b
        .sections
        .iter()
        .filter(|s| matches!(s.data, SectionData::Relocation(_)))
        .filter_map(|s| Some((s.id(), s.sh_info_section?)))
        .filter(|(_, t)| matches!(b.sections.get(*t).data, SectionData::Data(_)))
        .collect();

    for (rela_id, target) in work {
        let relocs = match &mut b.sections.get_mut(rela_id).data {
            SectionData::Relocation(r) => std::mem::take(r),
            _ => continue,
        };
        let mut code = match &b.sections.get(target).data {
            SectionData::Data(d) => d.to_vec(),
            _ => continue,
        };
        let relocs = relax_general_dynamic(&b, target, &mut code, relocs)?;
        let relocs = relax_local_dynamic(&b, target, &mut code, relocs)?;
        let mut kept = Vec::with_capacity(relocs.len());
        for r in relocs {
            if let Some(r) = fix_one(&mut b, &original, target, &mut code, r)? {
                kept.push(r);
            }
        }
        b.sections.get_mut(rela_id).data = SectionData::Relocation(kept);
        b.sections.get_mut(target).data = SectionData::Data(code.into());
    }
    write_builder(b).map_err(build_err)
}

/// The section symbol of `section`, added when the symbol table has none.
fn section_symbol(b: &mut Builder<'_>, section: SectionId) -> SymbolId {
    if let Some(s) = b
        .symbols
        .iter()
        .find(|s| s.st_type() == elf::STT_SECTION && s.section == Some(section))
    {
        return s.id();
    }
    let addr = b.sections.get(section).sh_addr;
    let sym = b.symbols.add();
    sym.section = Some(section);
    sym.set_st_info(elf::STB_LOCAL, elf::STT_SECTION);
    sym.st_value = addr;
    sym.id()
}

/// The placeholder section of the patch that stands for the original's section `name`.
fn section_by_name(b: &Builder<'_>, name: &str) -> Option<SectionId> {
    b.sections
        .iter()
        .find(|s| s.name.as_slice() == name.as_bytes())
        .map(|s| s.id())
}

fn read_i32(code: &[u8], field: usize) -> Option<i32> {
    let bytes = code.get(field..field.checked_add(4)?)?;
    Some(i32::from_le_bytes(bytes.try_into().ok()?))
}

/// Rewrites one relocation of `target` (whose bytes are `code`) by the rules in the crate
/// doc; `None` means the field is final and the relocation is dropped.
fn fix_one(
    b: &mut Builder<'_>,
    original: &Original<'_>,
    target: SectionId,
    code: &mut [u8],
    mut r: Relocation,
) -> Result<Option<Relocation>, Error> {
    let sec = b.sections.get(target);
    let field = r.r_offset.wrapping_sub(sec.sh_addr);
    let site = Site {
        r_type: r.r_type,
        section: sec.name.to_string(),
        offset: field,
    };
    let width = match r.r_type {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 => 8,
        elf::R_X86_64_NONE => 0,
        _ => 4,
    };
    if field
        .checked_add(width)
        .is_none_or(|end| end > code.len() as u64)
    {
        return Err(Error::RelocationOutOfRange {
            section: site.section,
            offset: field,
        });
    }
    let field = field as usize;

    // Compiler-local labels (.LC0, .L3) are not meaningful outside their object file:
    // refer to their section instead, the way the assembler does for local labels.
    if let Some(sym_id) = r.symbol {
        let sym = b.symbols.get(sym_id);
        if sym.st_type() != elf::STT_SECTION && sym.name.starts_with(b".L") {
            if let Some(section) = sym.section {
                let delta = sym.st_value.wrapping_sub(b.sections.get(section).sh_addr) as i64;
                r.symbol = Some(section_symbol(b, section));
                r.r_addend = r.r_addend.wrapping_add(delta);
            }
        }
    }

    match arch::classify(r.r_type) {
        Class::Plain => Ok(Some(r)),
        Class::Plt => {
            r.r_type = arch::R_PC32;
            Ok(Some(r))
        }
        Class::GotPcRel => {
            let sym_id = r
                .symbol
                .ok_or_else(|| site.unsupported("it has no symbol"))?;
            let sym = b.symbols.get(sym_id);
            let defined = sym.section.is_some() || sym.st_shndx == elf::SHN_ABS;
            if !defined {
                // Imported: the applier's jump-table slot serves as its GOT entry.
                return Ok(Some(r));
            }
            let load = arch::got_load_at(code, field);
            if load != GotLoad::Lea
                && original.is_shared_library()
                && sym.st_bind() != elf::STB_LOCAL
                && sym.st_other & 0x3 == elf::STV_DEFAULT
            {
                // A library's global may be interposed by the executable (copy
                // relocation): keep loading its address from the original's GOT slot,
                // which the dynamic linker filled, rather than pointing at our copy.
                let name = sym.name.to_vec();
                if let Some(slot) = original.got_slot(&name) {
                    retarget_to_slot(b, original, &mut r, slot, &site)?;
                    return Ok(Some(r));
                }
            }
            match load {
                GotLoad::Lea => r.r_type = arch::R_PC32,
                GotLoad::Mov => {
                    arch::mov_to_lea(code, field);
                    r.r_type = arch::R_PC32;
                }
                GotLoad::Other => {}
            }
            Ok(Some(r))
        }
        Class::TpOff32 if original.is_shared_library() => {
            // A library's thread-pointer offsets are only known at run time (local-dynamic
            // accesses turned into TPOFF32 above): the applier resolves the named variable.
            let sym_id = r
                .symbol
                .ok_or_else(|| site.unsupported("it has no symbol"))?;
            let sym = b.symbols.get(sym_id);
            if sym.st_type() == elf::STT_SECTION || sym.name.is_empty() {
                return Err(site.unsupported("a library's TLS access needs a named symbol"));
            }
            if !original.symbol(&sym.name).is_some_and(|s| s.is_tls) {
                return Err(Error::TlsSymbolMissing {
                    symbol: String::from_utf8_lossy(base_name(&sym.name)).into_owned(),
                    section: site.section.clone(),
                    offset: site.offset,
                });
            }
            Ok(Some(r))
        }
        Class::TpOff32 => {
            check_tpoff(b, original, code, field, &r, &site)?;
            // The field already holds the original's offset; nothing is left to resolve.
            Ok(None)
        }
        Class::GotTpOff => {
            if !arch::gottpoff_uses_got(code, field) {
                // The linker relaxed initial-exec to local-exec: a constant, like TPOFF32.
                check_tpoff(b, original, code, field, &r, &site)?;
                return Ok(None);
            }
            let sym_id = r
                .symbol
                .ok_or_else(|| site.unsupported("it has no symbol"))?;
            let sym = b.symbols.get(sym_id);
            if sym.st_type() == elf::STT_SECTION || sym.name.is_empty() {
                return Err(site.unsupported("initial-exec TLS access needs a named symbol"));
            }
            let name = sym.name.to_vec();
            let local_offset = original
                .symbol(&name)
                .filter(|s| s.is_tls)
                .map(|s| s.value);
            let no_slot = || Error::NoGotSlot {
                symbol: String::from_utf8_lossy(base_name(&name)).into_owned(),
                section: site.section.clone(),
                offset: site.offset,
            };
            match original.tls_got_slot(&name, local_offset) {
                Some(slot) => {
                    retarget_to_slot(b, original, &mut r, slot, &site)?;
                    Ok(Some(r))
                }
                // A library's own variable with no initial-exec slot (the original
                // reaches it through __tls_get_addr): keep the GOTTPOFF against the
                // variable; the applier computes its thread-pointer offset from the
                // running process (static TLS) and puts it in a jump-table slot.
                None if original.is_shared_library() && local_offset.is_some() => {
                    Ok(Some(r))
                }
                None => Err(no_slot()),
            }
        }
        Class::Unsupported => Err(site.unsupported(match r.r_type {
            elf::R_X86_64_TLSLD | elf::R_X86_64_DTPOFF32 | elf::R_X86_64_DTPOFF64 => {
                "local-dynamic TLS outside the standard sequence (lea x@tlsld(%rip),%rdi; call __tls_get_addr; x@dtpoff) is not supported; build with -ftls-model=initial-exec or global-dynamic"
            }
            _ => "the applier cannot resolve it",
        })),
    }
}

/// `data16 lea x@tlsgd(%rip),%rdi`: the start of a general-dynamic TLS access.
const GD_LEA: [u8; 4] = [0x66, 0x48, 0x8d, 0x3d];
/// `data16 data16 rex.W call __tls_get_addr@PLT` (the field follows).
const GD_CALL_PLT: [u8; 4] = [0x66, 0x66, 0x48, 0xe8];
/// `data16 call *__tls_get_addr@GOTPCREL(%rip)` (`-fno-plt`; the field follows).
const GD_CALL_GOT: [u8; 4] = [0x66, 0x48, 0xff, 0x15];
/// `mov %fs:0,%rax` then `add x@gottpoff(%rip),%rax` (field last): the initial-exec
/// form the linker relaxes a general-dynamic sequence into; same 16 bytes, same result
/// in `%rax`.
const IE_SEQ: [u8; 12] = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, 0x48, 0x03, 0x05];
/// `mov %fs:0,%rax; lea x@tpoff(%rax),%rax` (field last): ld's local-exec relaxation.
const LE_SEQ: [u8; 12] = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, 0x48, 0x8d, 0x80];

/// Rewrites every general-dynamic TLS access in `code` (a `TLSGD` relocation and the
/// `__tls_get_addr` call after it) into the initial-exec form, replacing the two
/// relocations by one `GOTTPOFF` against the variable. Shared libraries loaded at
/// startup have static TLS, so a fixed thread-pointer offset reaches the variable in
/// every thread; the applier checks that before it resolves the offset.
fn relax_general_dynamic(
    b: &Builder<'_>,
    target: SectionId,
    code: &mut [u8],
    relocs: Vec<Relocation>,
) -> Result<Vec<Relocation>, Error> {
    if !relocs.iter().any(|r| r.r_type == elf::R_X86_64_TLSGD) {
        return Ok(relocs);
    }
    let sec = b.sections.get(target);
    let (sec_addr, sec_name) = (sec.sh_addr, sec.name.to_string());
    let mut dropped = vec![false; relocs.len()];
    let mut added = Vec::new();
    for r in relocs.iter().filter(|r| r.r_type == elf::R_X86_64_TLSGD) {
        let field = r.r_offset.wrapping_sub(sec_addr);
        let bad = |why: &str| Error::UnsupportedRelocation {
            r_type: arch::reloc_name(r.r_type),
            section: sec_name.clone(),
            offset: field,
            why: why.to_string(),
        };
        let start = usize::try_from(field)
            .ok()
            .and_then(|f| f.checked_sub(GD_LEA.len()))
            .filter(|s| s.checked_add(16).is_some_and(|end| end <= code.len()))
            .ok_or_else(|| bad("the general-dynamic sequence does not fit in the section"))?;
        let call = &code[start + 8..start + 12];
        // `ld -q` keeps the input relocations even where it relaxed the sequence itself
        // (to initial-exec when the object has a TPOFF slot anyway, to local-exec in an
        // executable): the bytes tell which form is there.
        let r_type = if code[start..start + 4] == GD_LEA
            && (call == GD_CALL_PLT || call == GD_CALL_GOT)
        {
            code[start..start + IE_SEQ.len()].copy_from_slice(&IE_SEQ);
            elf::R_X86_64_GOTTPOFF
        } else if code[start..start + IE_SEQ.len()] == IE_SEQ {
            elf::R_X86_64_GOTTPOFF
        } else if code[start..start + 12] == LE_SEQ {
            elf::R_X86_64_TPOFF32
        } else {
            return Err(bad(
                "not the standard general-dynamic sequence (data16 lea x@tlsgd(%rip),%rdi; call __tls_get_addr)",
            ));
        };
        let call_at = r.r_offset.wrapping_add(8);
        let call_idx = relocs
            .iter()
            .position(|c| {
                c.r_offset == call_at
                    && c.symbol.is_some_and(|s| {
                        base_name(&b.symbols.get(s).name) == b"__tls_get_addr".as_slice()
                    })
            })
            .ok_or_else(|| bad("no relocation against __tls_get_addr follows it"))?;
        let sym = r.symbol.ok_or_else(|| bad("it has no symbol"))?;
        let s = b.symbols.get(sym);
        if s.st_type() == elf::STT_SECTION || s.name.is_empty() {
            return Err(bad("general-dynamic TLS access needs a named symbol"));
        }
        dropped[call_idx] = true;
        added.push(Relocation {
            r_offset: call_at,
            symbol: Some(sym),
            r_type,
            // GOTTPOFF: the field ends the `add`, %rip is 4 bytes past it.
            // TPOFF32: the field is the variable's offset itself.
            r_addend: if r_type == elf::R_X86_64_GOTTPOFF {
                -4
            } else {
                0
            },
        });
    }
    for (r, d) in relocs.iter().zip(&mut dropped) {
        if r.r_type == elf::R_X86_64_TLSGD {
            *d = true;
        }
    }
    let mut out: Vec<Relocation> = relocs
        .into_iter()
        .zip(dropped)
        .filter_map(|(r, d)| (!d).then_some(r))
        .collect();
    out.extend(added);
    out.sort_by_key(|r| r.r_offset);
    Ok(out)
}

/// `lea x@tlsld(%rip),%rdi`: the start of a local-dynamic TLS access.
const LD_LEA: [u8; 3] = [0x48, 0x8d, 0x3d];
/// `data16 data16 data16 mov %fs:0,%rax`: ld's local-exec form of the 12-byte
/// local-dynamic sequence (`lea` + `call __tls_get_addr@PLT`); `%rax` = thread pointer.
const LD_LE_SEQ: [u8; 12] = [0x66, 0x66, 0x66, 0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0];

/// Rewrites every local-dynamic TLS access in `code` the way ld relaxes it to
/// local-exec: the `lea x@tlsld(%rip),%rdi; call __tls_get_addr` that loads the module's
/// block address becomes a load of the thread pointer (`mov %fs:0,%rax`), and every
/// `x@dtpoff` (`DTPOFF32`, an offset in the block) becomes `x@tpoff` (`TPOFF32`, an
/// offset from the thread pointer). The relocations against `__tls_get_addr` go.
fn relax_local_dynamic(
    b: &Builder<'_>,
    target: SectionId,
    code: &mut [u8],
    relocs: Vec<Relocation>,
) -> Result<Vec<Relocation>, Error> {
    if !relocs.iter().any(|r| r.r_type == elf::R_X86_64_TLSLD) {
        return Ok(relocs);
    }
    let sec = b.sections.get(target);
    let (sec_addr, sec_name) = (sec.sh_addr, sec.name.to_string());
    let mut dropped = vec![false; relocs.len()];
    for (i, r) in relocs.iter().enumerate() {
        if r.r_type != elf::R_X86_64_TLSLD {
            continue;
        }
        let field = r.r_offset.wrapping_sub(sec_addr);
        let bad = |why: &str| Error::UnsupportedRelocation {
            r_type: arch::reloc_name(r.r_type),
            section: sec_name.clone(),
            offset: field,
            why: why.to_string(),
        };
        let start = usize::try_from(field)
            .ok()
            .and_then(|f| f.checked_sub(LD_LEA.len()))
            .filter(|s| s.checked_add(13).is_some_and(|end| end <= code.len()))
            .ok_or_else(|| bad("the local-dynamic sequence does not fit in the section"))?;
        // (sequence length, offset of the call's relocation from the TLSLD field)
        let (len, call_field) = if code[start..start + 3] == LD_LEA && code[start + 7] == 0xe8 {
            (12, 5)
        } else if code[start..start + 3] == LD_LEA && code[start + 7..start + 9] == [0xff, 0x15] {
            (13, 6)
        } else if code[start..start + 12] == LD_LE_SEQ {
            // Already relaxed by ld (an executable): the call relocation is at +5 or +6.
            (12, 0)
        } else {
            return Err(bad(
                "not the standard local-dynamic sequence (lea x@tlsld(%rip),%rdi; call __tls_get_addr)",
            ));
        };
        let is_tls_get_addr = |c: &Relocation| {
            c.symbol
                .is_some_and(|s| base_name(&b.symbols.get(s).name) == b"__tls_get_addr".as_slice())
        };
        let call_idx = relocs
            .iter()
            .position(|c| {
                let off = c.r_offset.wrapping_sub(r.r_offset);
                is_tls_get_addr(c)
                    && (off == call_field || (call_field == 0 && (off == 5 || off == 6)))
            })
            .ok_or_else(|| bad("no relocation against __tls_get_addr follows it"))?;
        if call_field != 0 {
            // A 13-byte (-fno-plt) sequence gets one more harmless data16 prefix.
            let seq = &mut code[start..start + len];
            seq.fill(0x66);
            seq[len - 9..].copy_from_slice(&LD_LE_SEQ[3..]);
        }
        dropped[i] = true;
        dropped[call_idx] = true;
    }
    Ok(relocs
        .into_iter()
        .zip(dropped)
        .filter_map(|(mut r, d)| {
            if r.r_type == elf::R_X86_64_DTPOFF32 {
                // %rax now holds the thread pointer, not the module's block.
                r.r_type = elf::R_X86_64_TPOFF32;
            }
            (!d).then_some(r)
        })
        .collect())
}

/// Makes `r` a `PC32` to the original's GOT slot at link-time address `slot`: section
/// symbol of the placeholder of the slot's section, addend + the slot's offset in it.
fn retarget_to_slot(
    b: &mut Builder<'_>,
    original: &Original<'_>,
    r: &mut Relocation,
    slot: u64,
    site: &Site,
) -> Result<(), Error> {
    let (orig_sec, orig_sec_addr) = original
        .section_at(slot)
        .ok_or_else(|| site.unsupported("the original's GOT slot lies outside every section"))?;
    let placeholder = section_by_name(b, &orig_sec).ok_or_else(|| {
        site.unsupported("the patch has no placeholder for the original's GOT section")
    })?;
    r.symbol = Some(section_symbol(b, placeholder));
    r.r_type = arch::R_PC32;
    r.r_addend = r
        .r_addend
        .wrapping_add(slot.wrapping_sub(orig_sec_addr) as i64);
    Ok(())
}

/// Checks that a local-exec TLS field holds the same thread-pointer offset the original
/// uses for the same variable.
fn check_tpoff(
    b: &Builder<'_>,
    original: &Original<'_>,
    code: &[u8],
    field: usize,
    r: &Relocation,
    site: &Site,
) -> Result<(), Error> {
    let tls = original
        .tls()
        .ok_or_else(|| site.unsupported("the original has no TLS segment"))?;
    let sym_id = r
        .symbol
        .ok_or_else(|| site.unsupported("it has no symbol"))?;
    let sym = b.symbols.get(sym_id);
    let (name, tls_off) = if sym.st_type() == elf::STT_SECTION {
        let sec = sym
            .section
            .map(|s| b.sections.get(s).name.to_string())
            .unwrap_or_default();
        let addr = original
            .section_addr(sec.as_bytes())
            .ok_or_else(|| site.unsupported("the original has no such TLS section"))?;
        (sec, addr.wrapping_sub(tls.vaddr))
    } else {
        let name = String::from_utf8_lossy(base_name(&sym.name)).into_owned();
        let o = original
            .symbol(&sym.name)
            .filter(|s| s.is_tls)
            .ok_or_else(|| Error::TlsSymbolMissing {
                symbol: name.clone(),
                section: site.section.clone(),
                offset: site.offset,
            })?;
        (name, o.value)
    };
    let expected = tls.tpoff(tls_off).wrapping_add(r.r_addend) as i32;
    let found = read_i32(code, field).ok_or_else(|| Error::RelocationOutOfRange {
        section: site.section.clone(),
        offset: site.offset,
    })?;
    if found != expected {
        return Err(Error::TlsOffsetMismatch {
            symbol: name,
            patched: found as i64,
            original: expected as i64,
            section: site.section.clone(),
            offset: site.offset,
        });
    }
    Ok(())
}
