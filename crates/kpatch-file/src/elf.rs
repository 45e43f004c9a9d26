//! Validation of the inner relocatable ELF, and a typed, fully checked view of it.
//!
//! Everything is read with explicit little-endian reads and checked before use, so the
//! view can be indexed by callers without further checks: every section's data is in
//! the file, every `sh_link`/`sh_info` index and symbol index is in range, every name is
//! NUL-terminated. Error offsets are absolute offsets in the `.kpatch` file.

use std::borrow::Cow;
use std::fmt::Display;

use object::elf::{
    ELFCLASS64, ELFDATA2LSB, ELFMAG, ET_REL, EV_CURRENT, SHF_ALLOC, SHF_EXECINSTR, SHF_INFO_LINK,
    SHF_WRITE, SHN_ABS, SHN_COMMON, SHN_LORESERVE, SHN_XINDEX, SHT_DYNSYM, SHT_NOBITS, SHT_NULL,
    SHT_PROGBITS, SHT_REL, SHT_RELA, SHT_STRTAB, SHT_SYMTAB, STT_FUNC, STT_GNU_IFUNC, STT_OBJECT,
    STT_SECTION, STT_TLS,
};

use crate::arch::Machine;
use crate::bytes::{add, escape, mul, to_u64, Region};
use crate::error::{Error, Result};

/// Size of an `Elf64_Ehdr`.
pub const EHDR_SIZE: u64 = 64;
/// Size of an `Elf64_Shdr`.
pub const SHDR_SIZE: u64 = 64;
/// Size of an `Elf64_Phdr`.
pub const PHDR_SIZE: u64 = 56;
/// Size of an `Elf64_Sym`.
pub const SYM_SIZE: u64 = 24;
/// Size of an `Elf64_Rela`.
pub const RELA_SIZE: u64 = 24;
/// Size of an `Elf64_Rel`.
pub const REL_SIZE: u64 = 16;

/// One section header, checked.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    /// Index in the section header table.
    pub index: usize,
    /// Name from the section header string table (without NUL).
    pub name: &'a [u8],
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addr`.
    pub addr: u64,
    /// `sh_offset` (relative to the ELF start).
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
    /// `sh_link`.
    pub link: u32,
    /// `sh_info`.
    pub info: u32,
    /// `sh_addralign`.
    pub addralign: u64,
    /// `sh_entsize`.
    pub entsize: u64,
    data: Option<&'a [u8]>,
}

impl<'a> Section<'a> {
    /// The name as text safe to print: bytes that do not print are escaped
    /// ([`crate::printable`]); a compiler's names come out unchanged.
    pub fn name_str(&self) -> Cow<'a, str> {
        Cow::Owned(crate::bytes::printable(self.name))
    }

    /// The section's bytes; `None` for `SHT_NOBITS` and `SHT_NULL` sections.
    pub fn data(&self) -> Option<&'a [u8]> {
        self.data
    }

    /// Whether the section occupies no file space.
    pub fn is_nobits(&self) -> bool {
        self.sh_type == SHT_NOBITS
    }
}

/// One symbol, checked (`st_name` resolved, `st_shndx` a valid section or special index).
#[derive(Debug, Clone)]
pub struct Symbol<'a> {
    /// Index in its symbol table.
    pub index: usize,
    /// Name (without NUL).
    pub name: &'a [u8],
    /// `st_value`.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_info` (binding in the high nibble, type in the low one).
    pub info: u8,
    /// `st_other` (visibility).
    pub other: u8,
    /// `st_shndx`.
    pub shndx: u16,
}

impl<'a> Symbol<'a> {
    /// The name as text safe to print: bytes that do not print are escaped
    /// ([`crate::printable`]); a compiler's names come out unchanged.
    pub fn name_str(&self) -> Cow<'a, str> {
        Cow::Owned(crate::bytes::printable(self.name))
    }

    /// `ELF64_ST_TYPE`.
    pub fn st_type(&self) -> u8 {
        self.info & 0xf
    }

    /// `ELF64_ST_BIND`.
    pub fn st_bind(&self) -> u8 {
        self.info >> 4
    }

    /// Whether the symbol is undefined (`SHN_UNDEF`).
    pub fn is_undefined(&self) -> bool {
        self.shndx == 0
    }
}

/// A symbol table section with its checked symbols.
#[derive(Debug, Clone)]
pub struct SymbolTable<'a> {
    /// Index of the `SHT_SYMTAB`/`SHT_DYNSYM` section.
    pub section: usize,
    /// Index of its string table (`sh_link`).
    pub strtab: usize,
    /// The symbols, index 0 included.
    pub symbols: Vec<Symbol<'a>>,
}

/// One relocation entry, checked (symbol index in range, offset inside the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relocation {
    /// `r_offset`, relative to the target section.
    pub offset: u64,
    /// `ELF64_R_TYPE(r_info)`.
    pub r_type: u32,
    /// `ELF64_R_SYM(r_info)`, an index into the linked symbol table.
    pub sym: u32,
    /// `r_addend` (0 for `SHT_REL`).
    pub addend: i64,
}

/// A relocation section with its checked entries.
#[derive(Debug, Clone)]
pub struct RelocationSection {
    /// Index of the `SHT_RELA`/`SHT_REL` section.
    pub section: usize,
    /// Index of the section the relocations apply to (`sh_info`).
    pub target: usize,
    /// Index of the symbol table section (`sh_link`).
    pub symtab: usize,
    /// Whether entries carry an addend (`SHT_RELA`).
    pub rela: bool,
    /// The entries.
    pub entries: Vec<Relocation>,
}

/// A fully validated 64-bit little-endian relocatable ELF.
#[derive(Debug, Clone)]
pub struct ElfView<'a> {
    data: &'a [u8],
    base: u64,
    machine: Machine,
    sections: Vec<Section<'a>>,
    symtabs: Vec<SymbolTable<'a>>,
    relocations: Vec<RelocationSection>,
}

/// The header fields we use, read in file order.
struct Ehdr {
    e_type: u16,
    e_machine: u16,
    e_version: u32,
    e_phoff: u64,
    e_shoff: u64,
    e_ehsize: u16,
    e_phentsize: u16,
    e_phnum: u16,
    e_shentsize: u16,
    e_shnum: u16,
    e_shstrndx: u16,
}

/// A raw section header before its data is checked.
struct Shdr {
    name: u32,
    sh_type: u32,
    flags: u64,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
    addralign: u64,
    entsize: u64,
}

impl<'a> ElfView<'a> {
    /// Validates `data` as the inner ELF of a patch. `base` is the ELF's offset in the
    /// `.kpatch` file (0 for a bare ELF); error offsets include it.
    pub fn parse(data: &'a [u8], base: u64) -> Result<ElfView<'a>> {
        let r = Region::new(data, base);
        let len = r.len();
        let ehdr = read_ehdr(&r)?;
        let machine =
            Machine::from_e_machine(ehdr.e_machine).ok_or_else(|| Error::Unsupported {
                field: "elf.e_machine".into(),
                offset: r.abs(18),
                value: ehdr.e_machine.into(),
                reason: "only x86_64 (62) and aarch64 (183) patches are supported".into(),
            })?;
        if ehdr.e_version != u32::from(EV_CURRENT) {
            return Err(invalid(
                &r,
                "elf.e_version",
                20,
                format!("{} is not 1", ehdr.e_version),
            ));
        }
        if u64::from(ehdr.e_ehsize) != EHDR_SIZE {
            return Err(invalid(
                &r,
                "elf.e_ehsize",
                52,
                format!("{} is not 64", ehdr.e_ehsize),
            ));
        }
        check_phdrs(&r, &ehdr)?;

        // Section header table.
        if ehdr.e_shoff == 0 {
            return Err(invalid(
                &r,
                "elf.e_shoff",
                40,
                "no section header table".into(),
            ));
        }
        if ehdr.e_shoff > len {
            return Err(past_end(
                &r,
                "elf.e_shoff",
                40,
                ehdr.e_shoff,
                "ELF".into(),
                len,
            ));
        }
        if u64::from(ehdr.e_shentsize) != SHDR_SIZE {
            let reason = format!("{} is not 64", ehdr.e_shentsize);
            return Err(invalid(&r, "elf.e_shentsize", 58, reason));
        }
        let sh0 = read_shdr(&r, ehdr.e_shoff, 0)?;
        // e_shnum 0 means the count is in section 0's sh_size (more than 0xff00 sections).
        let (count, count_field, count_off) = if ehdr.e_shnum == 0 {
            (
                sh0.size,
                "section[0].sh_size",
                ehdr.e_shoff.saturating_add(32),
            )
        } else {
            (u64::from(ehdr.e_shnum), "elf.e_shnum", 60)
        };
        let count_abs = if ehdr.e_shnum == 0 {
            r.abs(count_off)
        } else {
            r.abs(60)
        };
        if count == 0 {
            return Err(Error::Invalid {
                field: count_field.into(),
                offset: count_abs,
                reason: "the section header table is empty".into(),
            });
        }
        let table_size = mul(&count_field, count_abs, count, SHDR_SIZE)?;
        let table_end = add(&count_field, count_abs, ehdr.e_shoff, table_size)?;
        if table_end > len {
            return Err(Error::Invalid {
                field: count_field.into(),
                offset: count_abs,
                reason: format!(
                    "{count} section headers at e_shoff {:#x} end at {table_end:#x}, past end of ELF ({len} bytes)",
                    ehdr.e_shoff
                ),
            });
        }
        let (shstrndx, shstrndx_field, shstrndx_off) = if ehdr.e_shstrndx == SHN_XINDEX {
            (
                u64::from(sh0.link),
                "section[0].sh_link",
                r.abs(ehdr.e_shoff.saturating_add(40)),
            )
        } else {
            (u64::from(ehdr.e_shstrndx), "elf.e_shstrndx", r.abs(62))
        };
        if shstrndx == 0 || shstrndx >= count {
            return Err(Error::BadIndex {
                field: shstrndx_field.into(),
                offset: shstrndx_off,
                value: shstrndx,
                count,
                what: "sections; 0 would mean no names".into(),
            });
        }

        // Headers and data ranges.
        let mut shdrs = Vec::new();
        let mut datas = Vec::new();
        for i in 0..count {
            let at = ehdr.e_shoff.saturating_add(i.saturating_mul(SHDR_SIZE));
            let sh = read_shdr(&r, ehdr.e_shoff, i)?;
            let data = section_data(&r, &sh, i, at)?;
            check_links(&r, &sh, i, at, count)?;
            shdrs.push(sh);
            datas.push(data);
        }
        let shstr_i = usize::try_from(shstrndx).unwrap_or(usize::MAX);
        let shstrtab = match (shdrs.get(shstr_i), datas.get(shstr_i)) {
            (Some(sh), Some(Some(d))) if sh.sh_type == SHT_STRTAB => (*d, sh.offset),
            (Some(sh), _) => {
                return Err(Error::Invalid {
                    field: shstrndx_field.into(),
                    offset: shstrndx_off,
                    reason: format!(
                        "section {shstrndx} is not a string table with data (sh_type {})",
                        sh.sh_type
                    ),
                })
            }
            (None, _) => {
                return Err(Error::BadIndex {
                    field: shstrndx_field.into(),
                    offset: shstrndx_off,
                    value: shstrndx,
                    count,
                    what: "sections".into(),
                })
            }
        };
        let mut sections = Vec::with_capacity(shdrs.len());
        for (i, (sh, data)) in shdrs.iter().zip(datas).enumerate() {
            let at = ehdr
                .e_shoff
                .saturating_add(to_u64(i).saturating_mul(SHDR_SIZE));
            let name = cstr(
                &r,
                shstrtab,
                &format_args!("section[{i}].sh_name"),
                r.abs(at),
                sh.name,
                ".shstrtab",
            )?;
            sections.push(Section {
                index: i,
                name,
                sh_type: sh.sh_type,
                flags: sh.flags,
                addr: sh.addr,
                offset: sh.offset,
                size: sh.size,
                link: sh.link,
                info: sh.info,
                addralign: sh.addralign,
                entsize: sh.entsize,
                data,
            });
        }

        let symtabs = read_symtabs(&r, &sections, ehdr.e_shoff)?;
        let relocations = read_relocations(&r, &sections, &symtabs, ehdr.e_shoff, machine)?;
        check_overlaps(&r, &ehdr, count, &sections)?;
        check_code_sections(&r, &sections, ehdr.e_shoff)?;
        check_relocation_targets(&r, &sections, &relocations, ehdr.e_shoff, machine)?;
        check_symbol_placement(&r, &sections, &symtabs)?;
        Ok(ElfView {
            data,
            base,
            machine,
            sections,
            symtabs,
            relocations,
        })
    }

    /// The ELF bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Offset of the ELF in the `.kpatch` file.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The target machine.
    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// All sections, index 0 included.
    pub fn sections(&self) -> &[Section<'a>] {
        &self.sections
    }

    /// The section at `index`.
    pub fn section(&self, index: usize) -> Option<&Section<'a>> {
        self.sections.get(index)
    }

    /// The first section named `name`.
    pub fn section_by_name(&self, name: &str) -> Option<&Section<'a>> {
        self.sections.iter().find(|s| s.name == name.as_bytes())
    }

    /// Every symbol table that has data (`SHT_SYMTAB` and `SHT_DYNSYM`).
    pub fn symbol_tables(&self) -> &[SymbolTable<'a>] {
        &self.symtabs
    }

    /// The symbol table held in section `section`.
    pub fn symbol_table(&self, section: usize) -> Option<&SymbolTable<'a>> {
        self.symtabs.iter().find(|t| t.section == section)
    }

    /// The main symbol table (the first `SHT_SYMTAB`), if any.
    pub fn symtab(&self) -> Option<&SymbolTable<'a>> {
        self.symtabs.iter().find(|t| {
            self.sections
                .get(t.section)
                .is_some_and(|s| s.sh_type == SHT_SYMTAB)
        })
    }

    /// Every relocation section that has data.
    pub fn relocation_sections(&self) -> &[RelocationSection] {
        &self.relocations
    }

    /// The symbol `reloc` of relocation section `rel` refers to.
    pub fn reloc_symbol(&self, rel: &RelocationSection, reloc: &Relocation) -> Option<&Symbol<'a>> {
        let table = self.symbol_table(rel.symtab)?;
        table.symbols.get(usize::try_from(reloc.sym).ok()?)
    }

    /// A display name for a symbol: its own name, or its section's name for `STT_SECTION`.
    pub fn symbol_display_name(&self, sym: &Symbol<'a>) -> Cow<'a, str> {
        if sym.st_type() == STT_SECTION && sym.name.is_empty() {
            if let Some(s) = self.sections.get(usize::from(sym.shndx)) {
                return s.name_str();
            }
        }
        sym.name_str()
    }
}

/// A field name such as `section[41].sym[7].st_name`, formatted only when an error needs
/// it (formatting every field eagerly made parsing allocation-bound).
struct FieldPath<'a> {
    section: u64,
    entry: Option<(&'a str, u64)>,
    name: &'a str,
}

impl Display for FieldPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "section[{}]", self.section)?;
        if let Some((kind, k)) = self.entry {
            write!(f, ".{kind}[{k}]")?;
        }
        if !self.name.is_empty() {
            write!(f, ".{}", self.name)?;
        }
        Ok(())
    }
}

fn invalid(r: &Region<'_>, field: &str, off: u64, reason: String) -> Error {
    Error::Invalid {
        field: field.into(),
        offset: r.abs(off),
        reason,
    }
}

fn past_end(
    r: &Region<'_>,
    field: &str,
    off: u64,
    value: u64,
    region: String,
    limit: u64,
) -> Error {
    Error::PastEnd {
        field: field.into(),
        offset: r.abs(off),
        value,
        region,
        limit,
    }
}

fn read_ehdr(r: &Region<'_>) -> Result<Ehdr> {
    let ident: [u8; 16] = r.array(&"elf.e_ident", 0)?;
    if ident.get(..4) != Some(ELFMAG.as_slice()) {
        return Err(Error::BadMagic {
            field: "elf.e_ident[EI_MAG]".into(),
            offset: r.abs(0),
            found: escape(ident.get(..4).unwrap_or_default()),
            expected: "\\x7fELF",
        });
    }
    let class = ident.get(4).copied().unwrap_or_default();
    if class != ELFCLASS64 {
        return Err(Error::Unsupported {
            field: "elf.e_ident[EI_CLASS]".into(),
            offset: r.abs(4),
            value: class.into(),
            reason: "only 64-bit ELF (class 2) is supported".into(),
        });
    }
    let endian = ident.get(5).copied().unwrap_or_default();
    if endian != ELFDATA2LSB {
        return Err(Error::Unsupported {
            field: "elf.e_ident[EI_DATA]".into(),
            offset: r.abs(5),
            value: endian.into(),
            reason: "only little-endian ELF (data 1) is supported".into(),
        });
    }
    let version = ident.get(6).copied().unwrap_or_default();
    if version != EV_CURRENT {
        return Err(Error::Unsupported {
            field: "elf.e_ident[EI_VERSION]".into(),
            offset: r.abs(6),
            value: version.into(),
            reason: "only ELF version 1 exists".into(),
        });
    }
    let e_type = r.u16(&"elf.e_type", 16)?;
    let e_machine = r.u16(&"elf.e_machine", 18)?;
    let e_version = r.u32(&"elf.e_version", 20)?;
    r.u64(&"elf.e_entry", 24)?;
    let e_phoff = r.u64(&"elf.e_phoff", 32)?;
    let e_shoff = r.u64(&"elf.e_shoff", 40)?;
    r.u32(&"elf.e_flags", 48)?;
    let e_ehsize = r.u16(&"elf.e_ehsize", 52)?;
    let e_phentsize = r.u16(&"elf.e_phentsize", 54)?;
    let e_phnum = r.u16(&"elf.e_phnum", 56)?;
    let e_shentsize = r.u16(&"elf.e_shentsize", 58)?;
    let e_shnum = r.u16(&"elf.e_shnum", 60)?;
    let e_shstrndx = r.u16(&"elf.e_shstrndx", 62)?;
    if e_type != ET_REL {
        return Err(Error::Unsupported {
            field: "elf.e_type".into(),
            offset: r.abs(16),
            value: e_type.into(),
            reason: "a patch must be a relocatable ELF (ET_REL, 1)".into(),
        });
    }
    Ok(Ehdr {
        e_type,
        e_machine,
        e_version,
        e_phoff,
        e_shoff,
        e_ehsize,
        e_phentsize,
        e_phnum,
        e_shentsize,
        e_shnum,
        e_shstrndx,
    })
}

fn check_phdrs(r: &Region<'_>, ehdr: &Ehdr) -> Result<()> {
    debug_assert_eq!(ehdr.e_type, ET_REL);
    if ehdr.e_phnum == 0 {
        return Ok(());
    }
    if u64::from(ehdr.e_phentsize) != PHDR_SIZE {
        let reason = format!("{} is not 56", ehdr.e_phentsize);
        return Err(invalid(r, "elf.e_phentsize", 54, reason));
    }
    let size = mul(
        &"elf.e_phnum",
        r.abs(56),
        u64::from(ehdr.e_phnum),
        PHDR_SIZE,
    )?;
    let end = add(&"elf.e_phoff", r.abs(32), ehdr.e_phoff, size)?;
    if end > r.len() {
        return Err(past_end(r, "elf.e_phoff", 32, end, "ELF".into(), r.len()));
    }
    Ok(())
}

/// Reads section header `i` of the table at `shoff` (the caller checked the table fits,
/// except for section 0 read before the count is known).
fn read_shdr(r: &Region<'_>, shoff: u64, i: u64) -> Result<Shdr> {
    let at = add(
        &"elf.e_shoff",
        r.abs(40),
        shoff,
        mul(&"elf.e_shoff", r.abs(40), i, SHDR_SIZE)?,
    )?;
    let f = |name| FieldPath {
        section: i,
        entry: None,
        name,
    };
    let o = |d: u64| at.saturating_add(d);
    Ok(Shdr {
        name: r.u32(&f("sh_name"), o(0))?,
        sh_type: r.u32(&f("sh_type"), o(4))?,
        flags: r.u64(&f("sh_flags"), o(8))?,
        addr: r.u64(&f("sh_addr"), o(16))?,
        offset: r.u64(&f("sh_offset"), o(24))?,
        size: r.u64(&f("sh_size"), o(32))?,
        link: r.u32(&f("sh_link"), o(40))?,
        info: r.u32(&f("sh_info"), o(44))?,
        addralign: r.u64(&f("sh_addralign"), o(48))?,
        entsize: r.u64(&f("sh_entsize"), o(56))?,
    })
}

/// The section's bytes, after checking they lie in the ELF.
fn section_data<'a>(r: &Region<'a>, sh: &Shdr, i: u64, at: u64) -> Result<Option<&'a [u8]>> {
    if sh.sh_type == SHT_NOBITS || sh.sh_type == SHT_NULL {
        return Ok(None);
    }
    let len = r.len();
    if sh.offset > len {
        let field = format!("section[{i}].sh_offset");
        return Err(past_end(
            r,
            &field,
            at.saturating_add(24),
            sh.offset,
            "ELF".into(),
            len,
        ));
    }
    let end = sh.offset.checked_add(sh.size);
    match end {
        Some(end) if end <= len => {
            let field = FieldPath {
                section: i,
                entry: None,
                name: "",
            };
            Ok(Some(r.bytes(&field, sh.offset, sh.size)?))
        }
        _ => {
            let field = format!("section[{i}].sh_size");
            let region = format!("ELF from sh_offset {:#x}", sh.offset);
            Err(past_end(
                r,
                &field,
                at.saturating_add(32),
                sh.size,
                region,
                len,
            ))
        }
    }
}

fn check_links(r: &Region<'_>, sh: &Shdr, i: u64, at: u64, count: u64) -> Result<()> {
    if u64::from(sh.link) >= count {
        return Err(Error::BadIndex {
            field: format!("section[{i}].sh_link"),
            offset: r.abs(at.saturating_add(40)),
            value: sh.link.into(),
            count,
            what: "sections".into(),
        });
    }
    let info_is_index =
        sh.sh_type == SHT_REL || sh.sh_type == SHT_RELA || sh.flags & u64::from(SHF_INFO_LINK) != 0;
    if info_is_index && u64::from(sh.info) >= count {
        return Err(Error::BadIndex {
            field: format!("section[{i}].sh_info"),
            offset: r.abs(at.saturating_add(44)),
            value: sh.info.into(),
            count,
            what: "sections".into(),
        });
    }
    if sh.addralign != 0 && !sh.addralign.is_power_of_two() {
        return Err(Error::Invalid {
            field: format!("section[{i}].sh_addralign"),
            offset: r.abs(at.saturating_add(48)),
            reason: format!("{} is not a power of two", sh.addralign),
        });
    }
    Ok(())
}

/// The NUL-terminated string at `index` in `table` (`(bytes, offset in ELF)`).
fn cstr<'a>(
    r: &Region<'a>,
    table: (&'a [u8], u64),
    field: &dyn Display,
    field_off: u64,
    index: u32,
    table_name: &str,
) -> Result<&'a [u8]> {
    let (bytes, table_off) = table;
    let start = usize::try_from(index).unwrap_or(usize::MAX);
    let Some(tail) = bytes.get(start..).filter(|t| !t.is_empty()) else {
        return Err(Error::BadIndex {
            field: field.to_string(),
            offset: field_off,
            value: index.into(),
            count: to_u64(bytes.len()),
            what: format!("bytes in {table_name}"),
        });
    };
    match tail.iter().position(|&b| b == 0) {
        Some(end) => Ok(tail.get(..end).unwrap_or_default()),
        None => Err(Error::Unterminated {
            field: field.to_string(),
            offset: r.abs(table_off.saturating_add(index.into())),
            max: to_u64(tail.len()),
        }),
    }
}

fn section_field(shoff: u64, i: usize, d: u64) -> u64 {
    shoff
        .saturating_add(to_u64(i).saturating_mul(SHDR_SIZE))
        .saturating_add(d)
}

fn read_symtabs<'a>(
    r: &Region<'a>,
    sections: &[Section<'a>],
    shoff: u64,
) -> Result<Vec<SymbolTable<'a>>> {
    let mut out = Vec::new();
    for s in sections {
        if s.sh_type != SHT_SYMTAB && s.sh_type != SHT_DYNSYM {
            continue;
        }
        let Some(data) = s.data else { continue };
        let i = s.index;
        if s.entsize != SYM_SIZE {
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_entsize"),
                offset: r.abs(section_field(shoff, i, 56)),
                reason: format!("symbol entry size {} is not 24", s.entsize),
            });
        }
        if s.size % SYM_SIZE != 0 {
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_size"),
                offset: r.abs(section_field(shoff, i, 32)),
                reason: format!("{} is not a multiple of the symbol size 24", s.size),
            });
        }
        let strtab_i = usize::try_from(s.link).unwrap_or(usize::MAX);
        let strtab = match sections.get(strtab_i) {
            Some(t) if t.sh_type == SHT_STRTAB && t.data.is_some() => t,
            _ => {
                return Err(Error::Invalid {
                    field: format!("section[{i}].sh_link"),
                    offset: r.abs(section_field(shoff, i, 40)),
                    reason: format!("section {} is not a string table with data", s.link),
                })
            }
        };
        let strdata = (strtab.data.unwrap_or_default(), strtab.offset);
        let strname = format!("section {} ({})", strtab_i, strtab.name_str());
        let count = s.size / SYM_SIZE;
        if u64::from(s.info) > count {
            return Err(Error::BadIndex {
                field: format!("section[{i}].sh_info"),
                offset: r.abs(section_field(shoff, i, 44)),
                value: s.info.into(),
                count,
                what: "symbols (first non-local symbol index)".into(),
            });
        }
        let section_count = to_u64(sections.len());
        let t = Region::new(data, r.abs(s.offset));
        let mut symbols = Vec::new();
        for j in 0..count {
            let at = j.saturating_mul(SYM_SIZE);
            let f = |name| FieldPath {
                section: to_u64(i),
                entry: Some(("sym", j)),
                name,
            };
            let st_name = t.u32(&f("st_name"), at)?;
            let info = t.u8(&f("st_info"), at.saturating_add(4))?;
            let other = t.u8(&f("st_other"), at.saturating_add(5))?;
            let shndx = t.u16(&f("st_shndx"), at.saturating_add(6))?;
            let value = t.u64(&f("st_value"), at.saturating_add(8))?;
            let size = t.u64(&f("st_size"), at.saturating_add(16))?;
            let name = cstr(r, strdata, &f("st_name"), t.abs(at), st_name, &strname)?;
            check_shndx(
                &t,
                shndx,
                section_count,
                &f("st_shndx"),
                at.saturating_add(6),
            )?;
            let index = usize::try_from(j).unwrap_or(usize::MAX);
            symbols.push(Symbol {
                index,
                name,
                value,
                size,
                info,
                other,
                shndx,
            });
        }
        out.push(SymbolTable {
            section: i,
            strtab: strtab_i,
            symbols,
        });
    }
    Ok(out)
}

fn check_shndx(
    t: &Region<'_>,
    shndx: u16,
    count: u64,
    field: &dyn Display,
    off: u64,
) -> Result<()> {
    if shndx < SHN_LORESERVE {
        if u64::from(shndx) >= count {
            return Err(Error::BadIndex {
                field: field.to_string(),
                offset: t.abs(off),
                value: shndx.into(),
                count,
                what: "sections".into(),
            });
        }
        return Ok(());
    }
    if shndx == SHN_ABS || shndx == SHN_COMMON {
        return Ok(());
    }
    let reason = if shndx == SHN_XINDEX {
        "extended section indexes (SHN_XINDEX) are not supported in patches"
    } else {
        "reserved section index (only SHN_ABS and SHN_COMMON are allowed)"
    };
    Err(Error::Unsupported {
        field: field.to_string(),
        offset: t.abs(off),
        value: shndx.into(),
        reason: reason.into(),
    })
}

fn read_relocations(
    r: &Region<'_>,
    sections: &[Section<'_>],
    symtabs: &[SymbolTable<'_>],
    shoff: u64,
    machine: Machine,
) -> Result<Vec<RelocationSection>> {
    let mut out = Vec::new();
    for s in sections {
        let rela = match s.sh_type {
            SHT_RELA => true,
            SHT_REL => false,
            _ => continue,
        };
        let Some(data) = s.data else { continue };
        let i = s.index;
        let entsize = if rela { RELA_SIZE } else { REL_SIZE };
        if s.entsize != entsize {
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_entsize"),
                offset: r.abs(section_field(shoff, i, 56)),
                reason: format!("relocation entry size {} is not {entsize}", s.entsize),
            });
        }
        if s.size.checked_rem(entsize) != Some(0) {
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_size"),
                offset: r.abs(section_field(shoff, i, 32)),
                reason: format!("{} is not a multiple of the entry size {entsize}", s.size),
            });
        }
        let symtab_i = usize::try_from(s.link).unwrap_or(usize::MAX);
        let Some(symtab) = symtabs.iter().find(|t| t.section == symtab_i) else {
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_link"),
                offset: r.abs(section_field(shoff, i, 40)),
                reason: format!("section {} is not a symbol table with data", s.link),
            });
        };
        let nsyms = to_u64(symtab.symbols.len());
        let target_i = usize::try_from(s.info).unwrap_or(usize::MAX);
        let target_size = sections
            .get(target_i)
            .filter(|_| target_i != 0)
            .map(|t| t.size);
        let t = Region::new(data, r.abs(s.offset));
        let kind = if rela { "rela" } else { "rel" };
        let mut entries = Vec::new();
        for k in 0..s.size.checked_div(entsize).unwrap_or(0) {
            let at = k.saturating_mul(entsize);
            let f = |name| FieldPath {
                section: to_u64(i),
                entry: Some((kind, k)),
                name,
            };
            let offset = t.u64(&f("r_offset"), at)?;
            let info = t.u64(&f("r_info"), at.saturating_add(8))?;
            let addend = if rela {
                t.i64(&f("r_addend"), at.saturating_add(16))?
            } else {
                0
            };
            let sym = u32::try_from(info >> 32).unwrap_or(u32::MAX);
            let r_type = u32::try_from(info & 0xffff_ffff).unwrap_or(u32::MAX);
            if u64::from(sym) >= nsyms {
                return Err(Error::BadIndex {
                    field: f("r_info").to_string(),
                    offset: t.abs(at.saturating_add(8)),
                    value: sym.into(),
                    count: nsyms,
                    what: format!("symbols in section {symtab_i}"),
                });
            }
            if let Some(limit) = target_size {
                let end = offset.checked_add(machine.reloc_width(r_type));
                if end.is_none_or(|e| e > limit) {
                    return Err(Error::PastEnd {
                        field: f("r_offset").to_string(),
                        offset: t.abs(at),
                        value: offset,
                        region: format!(
                            "target section {target_i} for a {}-byte {}",
                            machine.reloc_width(r_type),
                            machine.reloc_name(r_type)
                        ),
                        limit,
                    });
                }
            }
            entries.push(Relocation {
                offset,
                r_type,
                sym,
                addend,
            });
        }
        out.push(RelocationSection {
            section: i,
            target: target_i,
            symtab: symtab_i,
            rela,
            entries,
        });
    }
    Ok(out)
}

/// What a range of the file holds, for [`check_overlaps`].
#[derive(Clone, Copy)]
enum Span {
    Ehdr,
    Phdrs,
    Shdrs,
    Section(usize),
}

/// Every byte of the ELF belongs to at most one thing: the ELF header, the program
/// headers, the section header table or one section's bytes. A forged overlap makes one
/// thing's bytes another's (code that is also the symbol table, relocations applied to
/// the section headers), which no tool ever writes.
fn check_overlaps(r: &Region<'_>, ehdr: &Ehdr, count: u64, sections: &[Section<'_>]) -> Result<()> {
    let mut spans: Vec<(u64, u64, Span)> = vec![(0, EHDR_SIZE, Span::Ehdr)];
    if ehdr.e_phnum != 0 {
        let size = u64::from(ehdr.e_phnum).saturating_mul(PHDR_SIZE);
        spans.push((ehdr.e_phoff, ehdr.e_phoff.saturating_add(size), Span::Phdrs));
    }
    let table = count.saturating_mul(SHDR_SIZE);
    spans.push((
        ehdr.e_shoff,
        ehdr.e_shoff.saturating_add(table),
        Span::Shdrs,
    ));
    for s in sections {
        if s.data.is_some() && s.size > 0 {
            spans.push((
                s.offset,
                s.offset.saturating_add(s.size),
                Span::Section(s.index),
            ));
        }
    }
    spans.sort_by_key(|&(start, end, _)| (start, end));
    let describe = |span: Span, start: u64, end: u64| match span {
        Span::Ehdr => format!("the ELF header ({start:#x}..{end:#x})"),
        Span::Phdrs => format!("the program headers ({start:#x}..{end:#x})"),
        Span::Shdrs => format!("the section header table ({start:#x}..{end:#x})"),
        Span::Section(i) => {
            let name = sections.get(i).map(|s| s.name_str()).unwrap_or_default();
            format!("section {i} ({name}, {start:#x}..{end:#x})")
        }
    };
    // The span reaching furthest so far: anything starting before its end overlaps it.
    let mut reach: Option<(u64, u64, Span)> = None;
    for &(start, end, span) in &spans {
        if let Some((p_start, p_end, p_span)) = reach {
            if start < p_end {
                // Name a section's sh_offset: that is the field a tool or a forger set.
                let (i, other) = match (span, p_span) {
                    (Span::Section(i), _) => (i, describe(p_span, p_start, p_end)),
                    (_, Span::Section(i)) => (i, describe(span, start, end)),
                    _ => continue,
                };
                let name = sections.get(i).map(|s| s.name_str()).unwrap_or_default();
                let (s_start, s_end) = sections
                    .get(i)
                    .map_or((0, 0), |s| (s.offset, s.offset.saturating_add(s.size)));
                return Err(Error::Invalid {
                    field: format!("section[{i}].sh_offset"),
                    offset: r.abs(section_field(ehdr.e_shoff, i, 24)),
                    reason: format!(
                        "section {i} ({name}) occupies {s_start:#x}..{s_end:#x}, which overlaps {other}: \
                         every section needs bytes of its own; the file is damaged or forged, rebuild the patch"
                    ),
                });
            }
            if end <= p_end {
                continue;
            }
        }
        reach = Some((start, end, span));
    }
    Ok(())
}

/// Whether the applier maps a section into the target: allocated, with bytes from the
/// file (or a zero-filled `.kpatch*` NOBITS section such as `.kpatch.bss`).
fn is_loaded(s: &Section<'_>) -> bool {
    let alloc = s.flags & u64::from(SHF_ALLOC) != 0;
    alloc
        && ((s.sh_type == SHT_PROGBITS && s.size > 0)
            || (s.sh_type == SHT_NOBITS && s.name.starts_with(b".kpatch")))
}

/// The patch's own code (`.kpatch*` sections the target will execute) must come from the
/// file: as NOBITS (or any other type) it would be mapped as zeros, or not at all, and
/// the jumps written into the target would land there.
fn check_code_sections(r: &Region<'_>, sections: &[Section<'_>], shoff: u64) -> Result<()> {
    for s in sections {
        let code = u64::from(SHF_ALLOC | SHF_EXECINSTR);
        if s.flags & code == code && s.name.starts_with(b".kpatch") && s.sh_type != SHT_PROGBITS {
            let i = s.index;
            return Err(Error::Invalid {
                field: format!("section[{i}].sh_type"),
                offset: r.abs(section_field(shoff, i, 4)),
                reason: format!(
                    "section {i} ({}) is executable patch code but its type is {:#x}, not \
                     PROGBITS (1): its code would not come from the file; the file is damaged \
                     or forged, rebuild the patch",
                    s.name_str(),
                    s.sh_type
                ),
            });
        }
    }
    Ok(())
}

/// Relocations reach the target only if they apply to a section the applier maps, and
/// a mapped section gets its relocations only from the section that names it in
/// `sh_info`. The rules (see `ElfView::parse`):
/// - a relocation section holding any relocation other than `R_*_NONE` must apply
///   (`sh_info`) to a real section; to an allocated one only if it is loaded (PROGBITS
///   with bytes). Relocations of non-allocated sections (`.rela.debug_*`) are ignored by
///   design and allowed; a section of only `R_*_NONE` entries (jemalloc's
///   `.rela.eh_frame`) changes nothing and may point anywhere;
/// - its name is `.rela` (`.rel`) followed by the name of the section it applies to, as
///   every assembler and linker writes it: a changed `sh_info` would move
///   `.rela.kpatch.text` onto another section and leave the code unrelocated;
/// - a section named `.rela<X>` for a loaded section `<X>` must be a relocation section
///   (SHT_RELA/SHT_REL), else `<X>`'s relocations would be silently dropped.
fn check_relocation_targets(
    r: &Region<'_>,
    sections: &[Section<'_>],
    relocations: &[RelocationSection],
    shoff: u64,
    machine: Machine,
) -> Result<()> {
    for rel in relocations {
        let i = rel.section;
        let Some(s) = sections.get(i) else { continue };
        let live = rel
            .entries
            .iter()
            .filter(|e| !machine.is_none_reloc(e.r_type))
            .count();
        if live == 0 {
            continue;
        }
        let name = s.name_str();
        let j = rel.target;
        let info_err = |reason: String| Error::Invalid {
            field: format!("section[{i}].sh_info"),
            offset: r.abs(section_field(shoff, i, 44)),
            reason,
        };
        let target = sections.get(j).filter(|_| j != 0);
        let Some(t) = target else {
            return Err(info_err(format!(
                "section {i} ({name}) holds {live} relocation(s) but applies to no section \
                 (sh_info {j}): they would never be applied; the file is damaged or forged, \
                 rebuild the patch"
            )));
        };
        let tname = t.name_str();
        if t.flags & u64::from(SHF_ALLOC) != 0 && !(t.sh_type == SHT_PROGBITS && t.data.is_some()) {
            return Err(info_err(format!(
                "section {i} ({name}) holds {live} relocation(s) for section {j} ({tname}, type \
                 {:#x}), which has no bytes in the patch and is not loaded: the relocations \
                 would be skipped; the file is damaged or forged, rebuild the patch",
                t.sh_type
            )));
        }
        let prefix: &[u8] = if rel.rela { b".rela" } else { b".rel" };
        let named_for = s.name.strip_prefix(prefix);
        if named_for != Some(t.name) {
            return Err(info_err(format!(
                "section {i} ({name}) applies its {live} relocation(s) to section {j} \
                 ({tname}), but a relocation section is named after the section it \
                 applies to ({}{tname}): sh_info was changed or the file was forged, \
                 rebuild the patch",
                String::from_utf8_lossy(prefix)
            )));
        }
    }
    // A loaded section's relocations held in a section that is not a relocation section.
    for s in sections {
        if s.sh_type == SHT_RELA || s.sh_type == SHT_REL || s.size == 0 {
            continue;
        }
        let named_for = s
            .name
            .strip_prefix(b".rela")
            .into_iter()
            .chain(s.name.strip_prefix(b".rel"));
        for x in named_for {
            if let Some(t) = sections.iter().find(|t| t.name == x && is_loaded(t)) {
                let i = s.index;
                return Err(Error::Invalid {
                    field: format!("section[{i}].sh_type"),
                    offset: r.abs(section_field(shoff, i, 4)),
                    reason: format!(
                        "section {i} ({}) holds the relocations of section {} ({}) but its \
                         type is {:#x}, not RELA (4) or REL (9): they would not be applied; \
                         the file is damaged or forged, rebuild the patch",
                        s.name_str(),
                        t.index,
                        t.name_str(),
                        s.sh_type
                    ),
                });
            }
        }
    }
    Ok(())
}

/// A symbol in a section the applier maps must suit it: a function in executable code,
/// a data object in writable data (patch data, even read-only literals, goes to
/// `.kpatch.data`/`.kpatch.bss`). A data symbol moved into code would make the patch
/// write into its read+exec mapping, a function moved into data would be jumped to.
fn check_symbol_placement(
    r: &Region<'_>,
    sections: &[Section<'_>],
    symtabs: &[SymbolTable<'_>],
) -> Result<()> {
    for table in symtabs {
        for sym in &table.symbols {
            if sym.shndx == 0 || sym.shndx >= SHN_LORESERVE {
                continue;
            }
            let Some(s) = sections
                .get(usize::from(sym.shndx))
                .filter(|s| is_loaded(s))
            else {
                continue;
            };
            let exec = s.flags & u64::from(SHF_EXECINSTR) != 0;
            let write = s.flags & u64::from(SHF_WRITE) != 0;
            let bad = match sym.st_type() {
                STT_FUNC | STT_GNU_IFUNC if !exec => {
                    "a function in a section that is not executable"
                }
                STT_OBJECT | STT_TLS if exec || !write => {
                    "a data object in a section that is not writable data"
                }
                _ => continue,
            };
            let at = to_u64(sym.index).saturating_mul(SYM_SIZE).saturating_add(6);
            let symtab_off = sections.get(table.section).map_or(0, |t| t.offset);
            return Err(Error::Invalid {
                field: format!("section[{}].sym[{}].st_shndx", table.section, sym.index),
                offset: r.abs(symtab_off.saturating_add(at)),
                reason: format!(
                    "symbol {} is {bad} (section {} {}): it was moved or the file was \
                     forged, rebuild the patch",
                    sym.name_str(),
                    s.index,
                    s.name_str()
                ),
            });
        }
    }
    Ok(())
}
