//! The host-side half of applying: parse the patch ELF, lay out the region, resolve
//! symbols against the target's loaded objects, and relocate into an image.
//!
//! This file is the patch-ELF view (sections, symbols, relocations, validation);
//! [`layout`] places and relocates the region image, [`object_view`] is the target's side.

use object::read::elf::{FileHeader, Rela as _, SectionHeader, Sym as _};
use object::{elf, LittleEndian as LE};

use crate::arch::{Native, PatchArch};
use crate::container::Patch;
use crate::Error;

mod layout;
mod object_view;

pub use layout::Layout;
pub use object_view::{ObjSym, ObjectView, TlsMemory};

type Hdr = elf::FileHeader64<LE>;
type Shdr = elf::SectionHeader64<LE>;
type Sym = elf::Sym64<LE>;

/// Size of one `.kpatch.info` record (LibCare `struct kpatch_info`, 64-bit).
const KPATCH_INFO_LEN: usize = 48;
/// Page size used for region layout.
const PAGE: u64 = 4096;

fn align(v: u64, a: u64) -> u64 {
    let a = a.max(1);
    v.div_ceil(a) * a
}

/// One relocation, decoded.
struct Reloc {
    target_sec: usize,
    offset: u64,
    r_type: u32,
    sym: usize,
    addend: i64,
}

/// The parsed patch ELF.
pub struct PatchElf<'a> {
    data: &'a [u8],
    secs: Vec<(String, &'a Shdr)>,
    syms: Vec<(String, &'a Sym)>,
    relocs: Vec<Reloc>,
}

fn is_loaded(name: &str, s: &Shdr) -> bool {
    let e = LE;
    let alloc = s.sh_flags(e) & elf::SHF_ALLOC as u64 != 0;
    let ty = s.sh_type(e);
    alloc
        && ((ty == elf::SHT_PROGBITS && s.sh_size(e) > 0)
            || (ty == elf::SHT_NOBITS && name.starts_with(".kpatch")))
}

impl<'a> PatchElf<'a> {
    /// Parses and validates the patch's relocatable ELF.
    pub fn parse(patch: &'a Patch) -> Result<PatchElf<'a>, Error> {
        let data = &patch.elf[..];
        let bad = |what: String| Error::BadPatch {
            path: patch.source.clone(),
            what,
        };
        let hdr = Hdr::parse(data).map_err(|e| bad(format!("ELF header: {e}")))?;
        let e = LE;
        if hdr.e_machine(e) != elf::EM_X86_64 {
            return Err(bad(format!("e_machine {} is not x86_64", hdr.e_machine(e))));
        }
        let st = hdr.sections(e, data).map_err(|er| {
            bad(format!(
                "section headers (e_shoff {:#x}): {er}",
                hdr.e_shoff(e)
            ))
        })?;
        let mut secs = Vec::new();
        for s in st.iter() {
            // Escaped: names reach the terminal in messages (a compiler's are unchanged).
            let name = kpatch_file::printable(
                st.section_name(e, s)
                    .map_err(|er| bad(format!("section name: {er}")))?,
            );
            if s.sh_type(e) != elf::SHT_NOBITS {
                let end = s.sh_offset(e).checked_add(s.sh_size(e));
                if end.is_none_or(|end| end > data.len() as u64) {
                    return Err(bad(format!(
                        "section {name}: offset {:#x} size {:#x} beyond the file",
                        s.sh_offset(e),
                        s.sh_size(e)
                    )));
                }
            }
            if s.sh_flags(e) & elf::SHF_TLS as u64 != 0 && is_loaded(&name, s) {
                return Err(bad(format!(
                    "section {name}: new thread-local variables are not supported"
                )));
            }
            secs.push((name, s));
        }
        let symtab = st
            .symbols(e, data, elf::SHT_SYMTAB)
            .map_err(|er| bad(format!("symbol table: {er}")))?;
        if symtab.is_empty() {
            return Err(bad("no symbol table".into()));
        }
        let mut syms = Vec::new();
        for sym in symtab.iter() {
            let name = kpatch_file::printable(
                symtab
                    .symbol_name(e, sym)
                    .map_err(|er| bad(format!("symbol name: {er}")))?,
            );
            let shndx = sym.st_shndx(e) as usize;
            if shndx != 0 && shndx < elf::SHN_LORESERVE as usize && shndx >= secs.len() {
                return Err(bad(format!(
                    "symbol {name}: section index {shndx} out of range"
                )));
            }
            syms.push((name, sym));
        }
        let mut relocs = Vec::new();
        for (name, s) in secs.iter() {
            if s.sh_type(e) == elf::SHT_REL {
                return Err(bad(format!(
                    "{name}: SHT_REL relocations are not supported"
                )));
            }
            if s.sh_type(e) != elf::SHT_RELA {
                continue;
            }
            let target = s.sh_info(e) as usize;
            let Some((tname, ts)) = secs.get(target) else {
                return Err(bad(format!("{name}: sh_info {target} is not a section")));
            };
            let (relas, _) = s
                .rela(e, data)
                .map_err(|er| bad(format!("{name}: {er}")))?
                .ok_or_else(|| bad(format!("{name}: not RELA")))?;
            if !is_loaded(tname, ts) {
                // Relocations of a section we do not load are only harmless if nothing
                // expects it loaded: debug sections, or entries that change nothing.
                let alloc = ts.sh_flags(e) & elf::SHF_ALLOC as u64 != 0;
                let live = relas
                    .iter()
                    .any(|r| r.r_type(e, false) != elf::R_X86_64_NONE);
                if (target != 0 && !alloc) || !live {
                    continue;
                }
                return Err(bad(format!(
                    "{name}: relocations for section {target} ({tname}), which is not loaded \
                     (sh_info): they would be skipped; rebuild the patch"
                )));
            }
            for r in relas {
                // R_X86_64_NONE changes nothing and names symbol 0: `ld -q` leaves them
                // where it dropped an FDE's target (jemalloc's `.rela.eh_frame`), and
                // LibCare's and LibcarePlus' patches carry them through strip.
                if r.r_type(e, false) == elf::R_X86_64_NONE {
                    continue;
                }
                let sym = r.r_sym(e, false) as usize;
                if sym >= syms.len() {
                    return Err(bad(format!("{name}: symbol index {sym} out of range")));
                }
                let offset = r.r_offset(e);
                if offset >= ts.sh_size(e) {
                    return Err(bad(format!(
                        "{name}: r_offset {offset:#x} outside {tname} (size {:#x})",
                        ts.sh_size(e)
                    )));
                }
                let r_type = r.r_type(e, false);
                let mut addend = r.r_addend(e);
                let s = syms[sym].1;
                if r_type == elf::R_X86_64_GOTTPOFF
                    && s.st_shndx(e) != elf::SHN_UNDEF
                    && s.st_type() == elf::STT_TLS
                {
                    // LibCare's and LibcarePlus' kpatch_strip store, in the addend of a
                    // GOTTPOFF against a variable of the object, the offset of the
                    // object's own TPOFF64 GOT slot. The field always ends its
                    // instruction (-4); the variable's slot here holds the same offset.
                    addend = -4;
                }
                relocs.push(Reloc {
                    target_sec: target,
                    offset,
                    r_type,
                    sym,
                    addend,
                });
            }
        }
        if !secs.iter().any(|(n, _)| n == ".kpatch.info") {
            return Err(bad("no .kpatch.info section".into()));
        }
        let pe = PatchElf {
            data,
            secs,
            syms,
            relocs,
        };
        Ok(pe)
    }

    /// Whether a relocation of the patch needs a TLS variable's thread-pointer offset.
    pub fn has_tls_relocations(&self) -> bool {
        self.relocs.iter().any(|r| Native::is_tls(r.r_type))
    }
}
