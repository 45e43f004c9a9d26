//! A read-only view of the ORIGINAL object (the binary the patch is for): the facts
//! rel-fixup and undo-link need from it (section addresses, symbols, TLS layout, GOT slots).

use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};
use object::{
    Endianness, Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags,
    RelocationTarget, SymbolSection,
};

use crate::Error;

/// A symbol defined in the original object.
#[derive(Debug, Clone)]
pub struct OrigSymbol {
    /// `st_value` (an address, or for `STT_TLS` the offset in the TLS segment).
    pub value: u64,
    /// Name of the section that defines it.
    pub section: String,
    /// Whether it is `STT_TLS`.
    pub is_tls: bool,
}

/// The TLS segment (`PT_TLS`) of the original object.
#[derive(Debug, Clone, Copy)]
pub struct TlsSegment {
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

impl TlsSegment {
    /// The x86-64 (variant II) thread-pointer offset of TLS offset `off`: the block ends at %fs.
    pub fn tpoff(&self, off: u64) -> i64 {
        let align = self.align.max(1);
        let size = self.memsz.div_ceil(align).wrapping_mul(align);
        (off as i64).wrapping_sub(size as i64)
    }
}

/// The original object, parsed once.
pub struct Original<'a> {
    file: ElfFile64<'a, Endianness>,
    data: &'a [u8],
}

/// A symbol name without its `@VERSION` / `@@VERSION` suffix (ld writes them into .symtab).
pub fn base_name(name: &[u8]) -> &[u8] {
    match name.iter().position(|&c| c == b'@') {
        Some(at) if at > 0 => &name[..at],
        _ => name,
    }
}

impl<'a> Original<'a> {
    /// Parses the original object (64-bit ELF only).
    pub fn parse(data: &'a [u8]) -> Result<Self, Error> {
        let file = ElfFile64::<Endianness>::parse(data).map_err(|e| Error::Parse {
            what: "original",
            reason: e.to_string(),
        })?;
        Ok(Original { file, data })
    }

    /// Whether the original is a shared library (ET_DYN without DF_1_PIE), whose global
    /// symbols the executable may interpose (copy relocations).
    pub fn is_shared_library(&self) -> bool {
        let endian = self.file.endian();
        if self.file.elf_header().e_type(endian) != elf::ET_DYN {
            return false;
        }
        let table = self.file.elf_section_table();
        let Ok(Some((dyns, _))) = table.dynamic(endian, self.data) else {
            return true;
        };
        !dyns.iter().any(|d| {
            d.d_tag(endian) == u64::from(elf::DT_FLAGS_1)
                && d.d_val(endian) & u64::from(elf::DF_1_PIE) != 0
        })
    }

    /// Link-time address of the GOT slot the dynamic linker fills with the address of
    /// `name` (an `R_X86_64_GLOB_DAT` against it).
    pub fn got_slot(&self, name: &[u8]) -> Option<u64> {
        self.dynamic_reloc_slot(elf::R_X86_64_GLOB_DAT, name, None)
    }

    /// Link-time address of the section called `name`.
    pub fn section_addr(&self, name: &[u8]) -> Option<u64> {
        self.file
            .sections()
            .find(|s| s.name_bytes().ok() == Some(name))
            .map(|s| s.address())
    }

    /// The section containing link-time address `addr` (name, start address).
    pub fn section_at(&self, addr: u64) -> Option<(String, u64)> {
        self.file
            .sections()
            .filter(|s| s.address() != 0 && s.size() != 0)
            .find(|s| addr >= s.address() && addr - s.address() < s.size())
            .and_then(|s| Some((s.name().ok()?.to_string(), s.address())))
    }

    /// A defined symbol called `name` (version suffix ignored), from .symtab, then .dynsym.
    pub fn symbol(&self, name: &[u8]) -> Option<OrigSymbol> {
        let want = base_name(name);
        if want.is_empty() {
            return None;
        }
        self.file
            .symbols()
            .chain(self.file.dynamic_symbols())
            .filter(|s| !s.is_undefined())
            .find(|s| s.name_bytes().map(base_name).ok() == Some(want))
            .and_then(|s| {
                let SymbolSection::Section(idx) = s.section() else {
                    return None;
                };
                let section = self.file.section_by_index(idx).ok()?;
                Some(OrigSymbol {
                    value: s.address(),
                    section: section.name().ok()?.to_string(),
                    is_tls: s.kind() == object::SymbolKind::Tls,
                })
            })
    }

    /// Like [`Original::symbol`], for a reference bound globally: when the name is also
    /// static in some file (redis: `dictFind` in dict.c and hiredis's async.c), the
    /// global definition is the one the link resolved it to, not the first local.
    pub fn global_symbol(&self, name: &[u8]) -> Option<OrigSymbol> {
        let want = base_name(name);
        if want.is_empty() {
            return None;
        }
        let global = self
            .file
            .symbols()
            .chain(self.file.dynamic_symbols())
            .filter(|s| !s.is_undefined() && s.is_global())
            .find(|s| s.name_bytes().map(base_name).ok() == Some(want));
        let Some(s) = global else {
            return self.symbol(name);
        };
        let SymbolSection::Section(idx) = s.section() else {
            return None;
        };
        let section = self.file.section_by_index(idx).ok()?;
        Some(OrigSymbol {
            value: s.address(),
            section: section.name().ok()?.to_string(),
            is_tls: s.kind() == object::SymbolKind::Tls,
        })
    }

    /// The PT_TLS segment, if the object has thread-local storage.
    pub fn tls(&self) -> Option<TlsSegment> {
        let endian = self.file.endian();
        self.file
            .elf_program_headers()
            .iter()
            .find(|ph| ph.p_type(endian) == elf::PT_TLS)
            .map(|ph| TlsSegment {
                vaddr: ph.p_vaddr(endian),
                memsz: ph.p_memsz(endian),
                align: ph.p_align(endian),
            })
    }

    /// Link-time address of the GOT slot holding the thread-pointer offset of TLS
    /// symbol `name` (an `R_X86_64_TPOFF64` dynamic relocation against it, or against no
    /// symbol with addend `local_offset` when the variable is the object's own).
    pub fn tls_got_slot(&self, name: &[u8], local_offset: Option<u64>) -> Option<u64> {
        self.dynamic_reloc_slot(elf::R_X86_64_TPOFF64, name, local_offset)
    }

    /// The `r_offset` of a dynamic relocation of type `r_type` against `name` (or against
    /// no symbol with addend `local_addend`).
    fn dynamic_reloc_slot(
        &self,
        r_type: u32,
        name: &[u8],
        local_addend: Option<u64>,
    ) -> Option<u64> {
        let want = base_name(name);
        let dynsyms = self.file.dynamic_symbol_table();
        self.file.dynamic_relocations()?.find_map(|(offset, rel)| {
            if rel.flags() != (RelocationFlags::Elf { r_type }) {
                return None;
            }
            let hit = match rel.target() {
                RelocationTarget::Symbol(idx) => {
                    let sym = dynsyms.as_ref()?.symbol_by_index(idx).ok()?;
                    let n = sym.name_bytes().ok()?;
                    if n.is_empty() {
                        local_addend == Some(rel.addend() as u64)
                    } else {
                        base_name(n) == want
                    }
                }
                RelocationTarget::Absolute => local_addend == Some(rel.addend() as u64),
                _ => false,
            };
            hit.then_some(offset)
        })
    }
}
