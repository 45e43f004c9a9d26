//! A description of a validated patch file (`livecare inspect`, like LibcarePlus'
//! `libcare-dump -H`): header fields, sections, symbols, relocations and the
//! `.kpatch.info` records with their names resolved. Serializable to JSON; its
//! `Display` is the human rendering.

use std::fmt;

use object::elf::*;
use serde::Serialize;

use crate::bytes::{printable, to_u64, until_nul, Region};
use crate::elf::{ElfView, RelocationSection};
use crate::PatchFile;

/// Size of one `.kpatch.info` record (`struct kpatch_info` on 64-bit).
pub const KPATCH_INFO_SIZE: u64 = 48;

/// Everything `inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The patch's id as every command prints it ([`crate::patch_identity`]).
    pub patch_id: String,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// The header.
    pub header: HeaderReport,
    /// The inner ELF.
    pub elf: ElfReport,
}

/// Header fields.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderReport {
    /// `LibCare` or `LibcarePlus`.
    pub layout: String,
    /// Header size in bytes.
    pub header_size: u64,
    /// Target build-id.
    pub build_id: String,
    /// Patch id (LibcarePlus).
    pub patch_id: Option<String>,
    /// `flags`.
    pub flags: u8,
    /// `safety_method`.
    pub safety_method: u8,
    /// `modulename`.
    pub modulename: String,
    /// `build_time`.
    pub build_time: u64,
    /// `csum`.
    pub csum: u32,
    /// `nr_reloc`.
    pub nr_reloc: u32,
    /// `kpatch_offset`.
    pub kpatch_offset: u32,
    /// `rel_offset`.
    pub rel_offset: u32,
    /// `total_size`.
    pub total_size: u32,
    /// `jmp_offset`.
    pub jmp_offset: u32,
    /// `elf_offset` (LibcarePlus).
    pub elf_offset: Option<u32>,
    /// `kpatch_total_mem_sz` (LibcarePlus).
    pub kpatch_total_mem_sz: Option<u64>,
    /// `entries[0]`.
    pub user_undo: u32,
    /// `entries[1]`.
    pub user_info: u32,
    /// `entries[2]`.
    pub user_level: u32,
    /// `srcversion`.
    pub srcversion: String,
}

/// The inner ELF.
#[derive(Debug, Clone, Serialize)]
pub struct ElfReport {
    /// `x86_64` or `aarch64`.
    pub machine: String,
    /// ELF size (including container padding).
    pub size: u64,
    /// Section headers.
    pub sections: Vec<SectionReport>,
    /// Symbols of every symbol table with data.
    pub symbols: Vec<SymbolReport>,
    /// Relocation sections with data.
    pub relocations: Vec<RelocSectionReport>,
    /// `.kpatch.info` records before the terminating all-zero record.
    pub kpatch_info: Vec<InfoRecord>,
}

/// One section header.
#[derive(Debug, Clone, Serialize)]
pub struct SectionReport {
    /// Index.
    pub index: usize,
    /// Name.
    pub name: String,
    /// Type name (`PROGBITS`, `RELA`, ...).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Flags as letters (`AX`, `WA`, ...), readelf-style.
    pub flags: String,
    /// `sh_addr`.
    pub addr: u64,
    /// `sh_offset` within the ELF.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
    /// `sh_link`.
    pub link: u32,
    /// `sh_info`.
    pub info: u32,
    /// `sh_addralign`.
    pub align: u64,
    /// `sh_entsize`.
    pub entsize: u64,
}

/// One symbol.
#[derive(Debug, Clone, Serialize)]
pub struct SymbolReport {
    /// Name of the symbol table section.
    pub table: String,
    /// Index in the table.
    pub index: usize,
    /// Name (section name for unnamed section symbols).
    pub name: String,
    /// `st_value`.
    pub value: u64,
    /// `st_size`.
    pub size: u64,
    /// Type (`FUNC`, `OBJECT`, ...).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Binding (`LOCAL`, `GLOBAL`, ...).
    pub bind: String,
    /// Section: `UND`, `ABS`, `COMMON`, or the index.
    pub shndx: String,
}

/// A relocation section.
#[derive(Debug, Clone, Serialize)]
pub struct RelocSectionReport {
    /// Relocation section name.
    pub section: String,
    /// Name of the section the entries apply to.
    pub target: String,
    /// Entries.
    pub entries: Vec<RelocReport>,
}

/// One relocation.
#[derive(Debug, Clone, Serialize)]
pub struct RelocReport {
    /// `r_offset` within the target section.
    pub offset: u64,
    /// Type name, e.g. `R_X86_64_PC32`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Symbol name.
    pub symbol: String,
    /// Addend.
    pub addend: i64,
}

/// One `.kpatch.info` record (LibCare `struct kpatch_info`).
#[derive(Debug, Clone, Serialize)]
pub struct InfoRecord {
    /// Offset of the record in `.kpatch.info`.
    pub offset: u64,
    /// Raw `daddr` (the original function; resolved through relocations at apply time).
    pub daddr: u64,
    /// Raw `saddr` (the new body).
    pub saddr: u64,
    /// Size of the original function.
    pub dlen: u32,
    /// Size of the new body.
    pub slen: u32,
    /// Raw `symstr`.
    pub symstr: u64,
    /// `vaddr` (filled at apply time).
    pub vaddr: u64,
    /// `flags`.
    pub flags: u32,
    /// The symbol `daddr` is relocated against (`report`, `foo+0x4`).
    pub daddr_symbol: Option<String>,
    /// The symbol `saddr` is relocated against (`report.kpatch`).
    pub saddr_symbol: Option<String>,
    /// The name `symstr` points at in `.kpatch.strtab`.
    pub name: Option<String>,
}

impl Report {
    /// Builds the report of a validated patch file.
    pub fn new(file: &PatchFile<'_>) -> Report {
        let h = file.header();
        let plus = h.layout() == crate::Layout::LibCarePlus;
        let header = HeaderReport {
            layout: h.layout().to_string(),
            header_size: to_u64(h.size()),
            build_id: h.build_id().to_string(),
            patch_id: h.patch_id().map(|p| p.to_string()),
            flags: h.flags,
            safety_method: h.safety_method,
            modulename: printable(h.modulename()),
            build_time: h.build_time,
            csum: h.csum,
            nr_reloc: h.nr_reloc,
            kpatch_offset: h.kpatch_offset,
            rel_offset: h.rel_offset,
            total_size: h.total_size,
            jmp_offset: h.jmp_offset,
            elf_offset: plus.then_some(h.elf_offset),
            kpatch_total_mem_sz: plus.then_some(h.kpatch_total_mem_sz),
            user_undo: h.user_undo(),
            user_info: h.user_info(),
            user_level: h.user_level(),
            srcversion: printable(h.srcversion()),
        };
        Report {
            patch_id: file.id(),
            file_size: to_u64(file.bytes().len()),
            header,
            elf: ElfReport::new(file.elf_view()),
        }
    }
}

impl ElfReport {
    /// Builds the ELF part of a report.
    pub fn new(view: &ElfView<'_>) -> ElfReport {
        let machine = view.machine();
        let sections = view
            .sections()
            .iter()
            .map(|s| SectionReport {
                index: s.index,
                name: s.name_str().into_owned(),
                type_name: section_type_name(s.sh_type),
                flags: section_flags(s.flags),
                addr: s.addr,
                offset: s.offset,
                size: s.size,
                link: s.link,
                info: s.info,
                align: s.addralign,
                entsize: s.entsize,
            })
            .collect();
        let section_name = |i: usize| {
            view.section(i)
                .map(|s| s.name_str().into_owned())
                .unwrap_or_default()
        };
        let mut symbols = Vec::new();
        for table in view.symbol_tables() {
            for sym in &table.symbols {
                symbols.push(SymbolReport {
                    table: section_name(table.section),
                    index: sym.index,
                    name: view.symbol_display_name(sym).into_owned(),
                    value: sym.value,
                    size: sym.size,
                    type_name: symbol_type_name(sym.st_type()),
                    bind: symbol_bind_name(sym.st_bind()),
                    shndx: match sym.shndx {
                        0 => "UND".into(),
                        SHN_ABS => "ABS".into(),
                        SHN_COMMON => "COMMON".into(),
                        n => n.to_string(),
                    },
                });
            }
        }
        let relocations = view
            .relocation_sections()
            .iter()
            .map(|rel| RelocSectionReport {
                section: section_name(rel.section),
                target: section_name(rel.target),
                entries: rel
                    .entries
                    .iter()
                    .map(|r| RelocReport {
                        offset: r.offset,
                        type_name: machine.reloc_name(r.r_type),
                        symbol: view
                            .reloc_symbol(rel, r)
                            .map(|s| view.symbol_display_name(s).into_owned())
                            .unwrap_or_default(),
                        addend: r.addend,
                    })
                    .collect(),
            })
            .collect();
        ElfReport {
            machine: format!("{machine:?}").to_lowercase(),
            size: to_u64(view.data().len()),
            sections,
            symbols,
            relocations,
            kpatch_info: kpatch_info_records(view),
        }
    }
}

/// The `.kpatch.info` records of a validated ELF, up to the all-zero terminator (or the
/// section's end), with the names of the symbols they are relocated against.
pub fn kpatch_info_records(view: &ElfView<'_>) -> Vec<InfoRecord> {
    let Some(info) = view.section_by_name(".kpatch.info") else {
        return Vec::new();
    };
    let Some(data) = info.data() else {
        return Vec::new();
    };
    let rels: Vec<&RelocationSection> = view
        .relocation_sections()
        .iter()
        .filter(|r| r.target == info.index)
        .collect();
    // The symbol (with addend) a relocation at `off` in .kpatch.info refers to.
    let reloc_at = |off: u64| {
        rels.iter().find_map(|rel| {
            rel.entries
                .iter()
                .find(|e| e.offset == off)
                .and_then(|e| view.reloc_symbol(rel, e).map(|s| (s, e.addend)))
        })
    };
    let has_reloc_in = |start: u64, end: u64| {
        rels.iter().any(|rel| {
            rel.entries
                .iter()
                .any(|e| e.offset >= start && e.offset < end)
        })
    };
    let strtab = view.section_by_name(".kpatch.strtab");
    let r = Region::new(data, 0);
    let mut out = Vec::new();
    let mut off = 0u64;
    while let Some(end) = off.checked_add(KPATCH_INFO_SIZE).filter(|&e| e <= r.len()) {
        let field = |d: u64| off.saturating_add(d);
        let rec = r.bytes(&"", off, KPATCH_INFO_SIZE).unwrap_or_default();
        if rec.iter().all(|&b| b == 0) && !has_reloc_in(off, end) {
            // A terminator; a patch linked from several objects has one per object.
            off = end;
            continue;
        }
        let daddr = r.u64(&"", field(0)).unwrap_or_default();
        let saddr = r.u64(&"", field(8)).unwrap_or_default();
        let symstr = r.u64(&"", field(24)).unwrap_or_default();
        let describe = |sym: Option<(&crate::elf::Symbol<'_>, i64)>| {
            sym.map(|(s, addend)| {
                let name = view.symbol_display_name(s);
                match addend {
                    0 => name.into_owned(),
                    a if a > 0 => format!("{name}+{a:#x}"),
                    a => format!("{name}-{:#x}", a.unsigned_abs()),
                }
            })
        };
        let name = match reloc_at(field(24)) {
            Some((sym, addend)) => {
                let target = view.section(usize::from(sym.shndx));
                target.and_then(|t| string_in(t, sym.value.checked_add_signed(addend)?))
            }
            None => strtab.and_then(|t| string_in(t, symstr)),
        };
        out.push(InfoRecord {
            offset: off,
            daddr,
            saddr,
            dlen: r.u32(&"", field(16)).unwrap_or_default(),
            slen: r.u32(&"", field(20)).unwrap_or_default(),
            symstr,
            vaddr: r.u64(&"", field(32)).unwrap_or_default(),
            flags: r.u32(&"", field(40)).unwrap_or_default(),
            daddr_symbol: describe(reloc_at(field(0))),
            saddr_symbol: describe(reloc_at(field(8))),
            name,
        });
        off = end;
    }
    out
}

/// Refuses `.kpatch.info` records that replace the same function twice, or overlapping
/// functions: the second jump would overwrite the first one's, and its saved bytes would
/// be the first jump, so `unpatch` could never restore the original code. The original
/// function is where the `daddr` relocation points (section + offset, or an undefined
/// symbol's name + addend); records without one are compared by their raw `daddr`.
pub(crate) fn check_hunks(view: &ElfView<'_>) -> crate::Result<()> {
    let Some(info) = view.section_by_name(".kpatch.info") else {
        return Ok(());
    };
    let Some(data) = info.data() else {
        return Ok(());
    };
    let rels: Vec<&RelocationSection> = view
        .relocation_sections()
        .iter()
        .filter(|r| r.target == info.index)
        .collect();
    let reloc_at = |off: u64| {
        rels.iter().find_map(|rel| {
            rel.entries
                .iter()
                .find(|e| e.offset == off)
                .and_then(|e| view.reloc_symbol(rel, e).map(|s| (s, e.addend)))
        })
    };
    let r = Region::new(data, 0);
    // (group, start, length, record index, record offset, description)
    let mut hunks: Vec<(Vec<u8>, u64, u64, u64, u64, String)> = Vec::new();
    let mut off = 0u64;
    let mut k = 0u64;
    while let Some(end) = off.checked_add(KPATCH_INFO_SIZE).filter(|&e| e <= r.len()) {
        let rec = r.bytes(&"", off, KPATCH_INFO_SIZE).unwrap_or_default();
        let reloc = reloc_at(off);
        if rec.iter().all(|&b| b == 0) && reloc.is_none() {
            off = end;
            k = k.saturating_add(1);
            continue;
        }
        let dlen = u64::from(r.u32(&"", off.saturating_add(16)).unwrap_or_default());
        let (group, start, desc) = match reloc {
            Some((sym, addend)) if sym.shndx != 0 && sym.shndx < SHN_LORESERVE => {
                let value = if sym.st_type() == STT_SECTION {
                    0
                } else {
                    sym.value
                };
                let start = value.wrapping_add_signed(addend);
                let sec = view
                    .section(usize::from(sym.shndx))
                    .map(|s| s.name_str().into_owned())
                    .unwrap_or_default();
                let mut g = b"s".to_vec();
                g.extend_from_slice(&sym.shndx.to_le_bytes());
                let name = view.symbol_display_name(sym);
                (g, start, format!("{name} ({sec}+{start:#x})"))
            }
            Some((sym, addend)) => {
                let mut g = b"n".to_vec();
                g.extend_from_slice(sym.name);
                let name = view.symbol_display_name(sym);
                (g, addend as u64, format!("{name}{addend:+#x}"))
            }
            None => {
                let daddr = r.u64(&"", off).unwrap_or_default();
                (b"a".to_vec(), daddr, format!("{daddr:#x}"))
            }
        };
        hunks.push((group, start, dlen.max(1), k, off, desc));
        off = end;
        k = k.saturating_add(1);
    }
    hunks.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    for pair in hunks.windows(2) {
        let [(g0, s0, l0, k0, _, d0), (g1, s1, l1, k1, off1, d1)] = pair else {
            continue;
        };
        if g0 == g1 && *s1 < s0.saturating_add(*l0) {
            return Err(crate::Error::Invalid {
                field: format!(".kpatch.info[{k1}].daddr"),
                offset: view
                    .base()
                    .saturating_add(info.offset)
                    .saturating_add(*off1),
                reason: format!(
                    "record {k1} replaces {d1} ({l1} bytes), which overlaps {d0} ({l0} bytes) \
                     that record {k0} already replaces: a patch replaces each function once \
                     (a second jump would overwrite the first and unpatch could not restore \
                     the code); the file is damaged or forged, rebuild the patch"
                ),
            });
        }
    }
    Ok(())
}

/// The string at `value` in `section`: `value` is either section-relative or, when the
/// patch kept link-time addresses, relative to `sh_addr`.
fn string_in(section: &crate::elf::Section<'_>, value: u64) -> Option<String> {
    let data = section.data()?;
    let candidates = [value.checked_sub(section.addr), Some(value)];
    candidates.into_iter().flatten().find_map(|off| {
        let tail = data.get(usize::try_from(off).ok()?..)?;
        until_nul(tail).map(printable)
    })
}

fn section_type_name(t: u32) -> String {
    let name = match t {
        SHT_NULL => "NULL",
        SHT_PROGBITS => "PROGBITS",
        SHT_SYMTAB => "SYMTAB",
        SHT_STRTAB => "STRTAB",
        SHT_RELA => "RELA",
        SHT_HASH => "HASH",
        SHT_DYNAMIC => "DYNAMIC",
        SHT_NOTE => "NOTE",
        SHT_NOBITS => "NOBITS",
        SHT_REL => "REL",
        SHT_SHLIB => "SHLIB",
        SHT_DYNSYM => "DYNSYM",
        SHT_INIT_ARRAY => "INIT_ARRAY",
        SHT_FINI_ARRAY => "FINI_ARRAY",
        SHT_PREINIT_ARRAY => "PREINIT_ARRAY",
        SHT_GROUP => "GROUP",
        SHT_SYMTAB_SHNDX => "SYMTAB_SHNDX",
        SHT_GNU_HASH => "GNU_HASH",
        SHT_GNU_VERSYM => "VERSYM",
        SHT_GNU_VERNEED => "VERNEED",
        SHT_GNU_VERDEF => "VERDEF",
        SHT_X86_64_UNWIND => "X86_64_UNWIND",
        _ => return format!("{t:#x}"),
    };
    name.to_string()
}

fn section_flags(flags: u64) -> String {
    let table: [(u32, char); 11] = [
        (SHF_WRITE, 'W'),
        (SHF_ALLOC, 'A'),
        (SHF_EXECINSTR, 'X'),
        (SHF_MERGE, 'M'),
        (SHF_STRINGS, 'S'),
        (SHF_INFO_LINK, 'I'),
        (SHF_LINK_ORDER, 'L'),
        (SHF_OS_NONCONFORMING, 'O'),
        (SHF_GROUP, 'G'),
        (SHF_TLS, 'T'),
        (SHF_EXCLUDE, 'E'),
    ];
    table
        .iter()
        .filter(|(bit, _)| flags & u64::from(*bit) != 0)
        .map(|(_, c)| *c)
        .collect()
}

fn symbol_type_name(t: u8) -> String {
    let name = match t {
        STT_NOTYPE => "NOTYPE",
        STT_OBJECT => "OBJECT",
        STT_FUNC => "FUNC",
        STT_SECTION => "SECTION",
        STT_FILE => "FILE",
        STT_COMMON => "COMMON",
        STT_TLS => "TLS",
        STT_GNU_IFUNC => "IFUNC",
        _ => return t.to_string(),
    };
    name.to_string()
}

fn symbol_bind_name(b: u8) -> String {
    let name = match b {
        STB_LOCAL => "LOCAL",
        STB_GLOBAL => "GLOBAL",
        STB_WEAK => "WEAK",
        STB_GNU_UNIQUE => "UNIQUE",
        _ => return b.to_string(),
    };
    name.to_string()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "Header ({} layout, {} bytes; file {} bytes):",
            h.layout, h.header_size, self.file_size
        )?;
        writeln!(f, "  build-id:       {}", h.build_id)?;
        writeln!(
            f,
            "  patch id:       {}{}",
            self.patch_id,
            if h.patch_id.is_some() {
                ""
            } else {
                " (none in the header: the hash of the ELF, as the applier names it)"
            }
        )?;
        writeln!(f, "  modulename:     {}", h.modulename)?;
        writeln!(f, "  flags:          {:#x}", h.flags)?;
        writeln!(f, "  safety_method:  {}", h.safety_method)?;
        writeln!(f, "  build_time:     {}", h.build_time)?;
        let csum_note = if h.csum == 0 {
            "none (as LibCare/LibcarePlus write)"
        } else {
            "CRC-32 of the ELF, verified"
        };
        writeln!(f, "  csum:           {:#x} ({csum_note})", h.csum)?;
        writeln!(f, "  nr_reloc:       {}", h.nr_reloc)?;
        writeln!(f, "  kpatch_offset:  {:#x}", h.kpatch_offset)?;
        writeln!(f, "  rel_offset:     {:#x}", h.rel_offset)?;
        writeln!(f, "  total_size:     {:#x}", h.total_size)?;
        writeln!(f, "  jmp_offset:     {:#x}", h.jmp_offset)?;
        if let Some(v) = h.elf_offset {
            writeln!(f, "  elf_offset:     {v:#x}")?;
        }
        if let Some(v) = h.kpatch_total_mem_sz {
            writeln!(f, "  total_mem_sz:   {v:#x}")?;
        }
        writeln!(f, "  user_undo:      {:#x}", h.user_undo)?;
        writeln!(f, "  user_info:      {:#x}", h.user_info)?;
        writeln!(f, "  user_level:     {}", h.user_level)?;
        writeln!(f, "  srcversion:     {}", h.srcversion)?;

        let e = &self.elf;
        writeln!(
            f,
            "\nELF ({}, relocatable, {} bytes), {} sections:",
            e.machine,
            e.size,
            e.sections.len()
        )?;
        writeln!(
            f,
            "  [Nr] {:<24} {:<13} {:<5} {:>16} {:>8} {:>8} {:>4} {:>4} {:>5} {:>4}",
            "Name", "Type", "Flags", "Address", "Offset", "Size", "Link", "Info", "Align", "ES"
        )?;
        for s in &e.sections {
            writeln!(
                f,
                "  [{:>2}] {:<24} {:<13} {:<5} {:>16x} {:>8x} {:>8x} {:>4} {:>4} {:>5} {:>4x}",
                s.index,
                s.name,
                s.type_name,
                s.flags,
                s.addr,
                s.offset,
                s.size,
                s.link,
                s.info,
                s.align,
                s.entsize
            )?;
        }
        writeln!(f, "\nSymbols ({}):", e.symbols.len())?;
        writeln!(
            f,
            "  {:<10} {:>4} {:>16} {:>6} {:<7} {:<6} {:>6} Name",
            "Table", "Num", "Value", "Size", "Type", "Bind", "Ndx"
        )?;
        for s in &e.symbols {
            writeln!(
                f,
                "  {:<10} {:>4} {:>16x} {:>6} {:<7} {:<6} {:>6} {}",
                s.table, s.index, s.value, s.size, s.type_name, s.bind, s.shndx, s.name
            )?;
        }
        for rel in &e.relocations {
            writeln!(
                f,
                "\nRelocations in {} (for {}), {} entries:",
                rel.section,
                rel.target,
                rel.entries.len()
            )?;
            for r in &rel.entries {
                let sign = if r.addend < 0 { '-' } else { '+' };
                writeln!(
                    f,
                    "  {:>8x}  {:<24} {} {} {:#x}",
                    r.offset,
                    r.type_name,
                    r.symbol,
                    sign,
                    r.addend.unsigned_abs()
                )?;
            }
        }
        writeln!(f, "\n.kpatch.info: {} record(s)", e.kpatch_info.len())?;
        for r in &e.kpatch_info {
            let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "  {:>4x}: name {}  daddr {} (dlen {:#x})  saddr {} (slen {:#x})  flags {:#x}",
                r.offset,
                dash(&r.name),
                r.daddr_symbol
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", r.daddr)),
                r.dlen,
                r.saddr_symbol
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", r.saddr)),
                r.slen,
                r.flags
            )?;
        }
        Ok(())
    }
}
