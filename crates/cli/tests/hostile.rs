//! Hostile-input corpus (issue 7): a real patch for a running gcc-built target is built
//! once, then hundreds of corrupted and forged variants of it are fed to
//! `livecare patch -p PID`. livecare must never panic or die of a signal; a rejected
//! file must exit 1 with an `error:` message and leave the target's maps and code bytes
//! byte-identical, the target alive and neither stopped nor traced. A variant that is
//! genuinely still valid (for example a flip in header padding) may apply: then the
//! target must keep printing correct output and `livecare unpatch` must restore it
//! byte for byte.
//!
//! Variants: truncations every 16 bytes, 100 seeded random multi-byte flips (checksum
//! left as is, as a corrupted file would be), and crafted values with the checksum
//! recomputed so they reach the ELF parsers: e_shnum/e_shoff/e_shstrndx/e_shentsize,
//! sh_offset/sh_size/sh_link/sh_info of every section, st_shndx/st_value/st_name of
//! symbols, r_info/r_offset of relocations (offsets outside their section), huge sizes
//! and shifted addresses in `.kpatch.info` and in the relocations that fill it (daddr,
//! saddr), header offsets, a 256-byte unterminated build-id, a forged build-id (this
//! target's id on another binary's patch) and a patch for another binary. Structural
//! forgeries (issue 16): relocation sections moved onto other sections (`sh_info`),
//! retyped sections (`sh_type`), sections overlapping each other or the headers
//! (`sh_offset`), symbols moved into other sections (`st_shndx`), data symbols at another
//! place, size or type than the target's, and two `.kpatch.info` records replacing one
//! function (from the two-hunk patch).
//!
//! A second test replays the crashes the fuzzers found (fuzz/crashes/) through the CLI.
//! `HOSTILE_KEEP=<dir>` keeps the target, the valid patch and every failing file.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::mem::offset_of;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kpatch_file::header::raw::{LibCareHeader, LibCarePlusHeader};
use kpatch_file::{Layout, PatchFile};
use testkit::patchbuild::{Builder, Flags, Patch};
use testkit::{fixture_dir, Link, MemorySnapshot, Running, Scratch, Seen};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// A single livecare run taking longer than this counts as a hang.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

/// Sub-cases known to fail because of a bug in a crate this test does not own; they
/// are run and reported loudly but do not fail CI. Empty: the livecare-apply bugs this
/// corpus found (symbol outside its section of the target, saddr not a function start
/// of `.kpatch.text`) are fixed, and their files in tests/fixtures/hostile-found/ are
/// replayed as regressions by `found_hostile_files_are_rejected_before_touching_the_target`.
const KNOWN_BUGS: &[(&str, &str)] = &[];

/// xorshift64*: a tiny seeded generator, so every run produces the same corpus.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// One section header of the patch ELF, with its file offset inside the container.
#[derive(Debug, Clone)]
struct Sec {
    name: String,
    /// Offset of the section header in the container.
    hdr: usize,
    sh_type: u32,
    offset: usize,
    size: usize,
    link: usize,
}

/// Where things are in the valid container, to aim the crafted mutations.
struct Anatomy {
    /// Container bytes.
    bytes: Vec<u8>,
    /// Offset of `csum` in the header.
    csum_at: usize,
    /// Offsets of `kpatch_offset`, `rel_offset`, `total_size` in the header.
    kpatch_offset_at: usize,
    rel_offset_at: usize,
    total_size_at: usize,
    /// Start and end of the ELF in the container.
    elf: usize,
    elf_end: usize,
    shnum: usize,
    secs: Vec<Sec>,
}

impl Anatomy {
    fn new(bytes: Vec<u8>) -> Result<Anatomy> {
        let pf = PatchFile::parse(&bytes).context("the valid patch parses")?;
        let (csum_at, ko, ro, to) = match pf.layout() {
            Layout::LibCare => (
                offset_of!(LibCareHeader, csum),
                offset_of!(LibCareHeader, kpatch_offset),
                offset_of!(LibCareHeader, rel_offset),
                offset_of!(LibCareHeader, total_size),
            ),
            Layout::LibCarePlus => (
                offset_of!(LibCarePlusHeader, csum),
                offset_of!(LibCarePlusHeader, kpatch_offset),
                offset_of!(LibCarePlusHeader, rel_offset),
                offset_of!(LibCarePlusHeader, total_size),
            ),
        };
        let elf = pf.header().kpatch_offset as usize;
        let elf_end = pf.header().total_size as usize;
        let e = &bytes[elf..];
        let shoff = rd64(e, 0x28) as usize;
        let shnum = rd16(e, 0x3c) as usize;
        let shstrndx = rd16(e, 0x3e) as usize;
        let sh = |i: usize| elf + shoff + 64 * i;
        let str_off = rd64(&bytes, sh(shstrndx) + 24) as usize;
        let mut secs = Vec::new();
        for i in 0..shnum {
            let h = sh(i);
            let name_at = elf + str_off + rd32(&bytes, h) as usize;
            let name_len = bytes[name_at..].iter().position(|&c| c == 0).unwrap_or(0);
            secs.push(Sec {
                name: String::from_utf8_lossy(&bytes[name_at..name_at + name_len]).into_owned(),
                hdr: h,
                sh_type: rd32(&bytes, h + 4),
                offset: elf + rd64(&bytes, h + 24) as usize,
                size: rd64(&bytes, h + 32) as usize,
                link: rd32(&bytes, h + 40) as usize,
            });
        }
        Ok(Anatomy {
            csum_at,
            kpatch_offset_at: ko,
            rel_offset_at: ro,
            total_size_at: to,
            elf,
            elf_end,
            shnum,
            secs,
            bytes,
        })
    }

    /// The container with `f` applied and the CRC-32 recomputed, so the mutation gets
    /// past the checksum to the ELF parsers.
    fn crafted(&self, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = self.bytes.clone();
        f(&mut b);
        if rd32(&b, self.csum_at) != 0 && b.len() >= self.elf_end {
            let crc = kpatch_file::crc32(&b[self.elf..self.elf_end]);
            wr32(&mut b, self.csum_at, crc);
        }
        b
    }

    fn sec(&self, name: &str) -> Option<&Sec> {
        self.secs.iter().find(|s| s.name == name)
    }
}

/// A hostile file and what it is.
struct Case {
    name: String,
    bytes: Vec<u8>,
}

/// Every variant of the valid patch `a`.
fn corpus(a: &Anatomy) -> Vec<Case> {
    let mut v: Vec<Case> = Vec::new();
    let mut add = |name: String, bytes: Vec<u8>| v.push(Case { name, bytes });
    let len = a.bytes.len();

    // Truncations every 16 bytes.
    for cut in (0..len).step_by(16) {
        add(format!("truncated at {cut}"), a.bytes[..cut].to_vec());
    }

    // Random multi-byte flips anywhere, checksum untouched (a corrupted file).
    let mut rng = XorShift(0x5eed_11fe_ca4e_0007);
    for i in 0..100 {
        let mut b = a.bytes.clone();
        let n = 1 + rng.below(8);
        let mut at = Vec::new();
        for _ in 0..n {
            let o = rng.below(len);
            b[o] ^= 1 + rng.below(255) as u8;
            at.push(o);
        }
        add(format!("flip #{i} at {at:?}"), b);
    }

    // ELF header fields.
    let eh = a.elf;
    let huge = 0xffff_ffff_ffff_fff0u64;
    for (what, v16) in [
        ("e_shnum=0", 0u16),
        ("e_shnum=1", 1),
        ("e_shnum=0xffff", 0xffff),
        ("e_shnum+1", a.shnum as u16 + 1),
    ] {
        add(what.into(), a.crafted(|b| wr16(b, eh + 0x3c, v16)));
    }
    for (what, v16) in [
        ("e_shstrndx=0xffff", 0xffffu16),
        ("e_shstrndx=shnum", a.shnum as u16),
    ] {
        add(what.into(), a.crafted(|b| wr16(b, eh + 0x3e, v16)));
    }
    for (what, v16) in [("e_shentsize=0", 0u16), ("e_shentsize=32", 32)] {
        add(what.into(), a.crafted(|b| wr16(b, eh + 0x3a, v16)));
    }
    let shoff = rd64(&a.bytes, eh + 0x28);
    let elf_len = (a.elf_end - a.elf) as u64;
    for (what, v64) in [
        ("e_shoff=0", 0u64),
        ("e_shoff=1", 1),
        ("e_shoff=len-1", elf_len - 1),
        ("e_shoff=len", elf_len),
        ("e_shoff=huge", huge),
        ("e_shoff+8", shoff + 8),
        ("e_shoff-64", shoff - 64),
    ] {
        add(what.into(), a.crafted(|b| wr64(b, eh + 0x28, v64)));
    }
    add(
        "e_machine=EM_386".into(),
        a.crafted(|b| wr16(b, eh + 0x12, 3)),
    );
    add(
        "e_type=ET_EXEC".into(),
        a.crafted(|b| wr16(b, eh + 0x10, 2)),
    );
    add("EI_CLASS=32".into(), a.crafted(|b| b[eh + 4] = 1));

    // Section header fields of every section.
    for (i, s) in a.secs.iter().enumerate().skip(1) {
        let h = s.hdr;
        let n = &s.name;
        let nobits = s.sh_type == 8;
        if !nobits {
            for (what, v64) in [("huge", huge), ("len", elf_len), ("len-1", elf_len - 1)] {
                add(
                    format!("[{i}] {n} sh_offset={what}"),
                    a.crafted(|b| wr64(b, h + 24, v64)),
                );
            }
        }
        for (what, v64) in [("huge", huge), ("len+1", elf_len + 1)] {
            add(
                format!("[{i}] {n} sh_size={what}"),
                a.crafted(|b| wr64(b, h + 32, v64)),
            );
        }
        if s.link != 0 || matches!(s.sh_type, 2 | 4 | 11) {
            for v32 in [0xffffu32, a.shnum as u32, 0] {
                add(
                    format!("[{i}] {n} sh_link={v32:#x}"),
                    a.crafted(|b| wr32(b, h + 40, v32)),
                );
            }
        }
        if s.sh_type == 4 {
            for v32 in [0xffffu32, a.shnum as u32] {
                add(
                    format!("[{i}] {n} sh_info={v32:#x}"),
                    a.crafted(|b| wr32(b, h + 44, v32)),
                );
            }
            add(
                format!("[{i}] {n} sh_entsize=0"),
                a.crafted(|b| wr64(b, h + 56, 0)),
            );
        }
        add(
            format!("[{i}] {n} sh_name=huge"),
            a.crafted(|b| wr32(b, h, 0xffff_fff0)),
        );
    }

    // Symbols: section index, value, name.
    if let Some(st) = a.sec(".symtab") {
        let count = st.size / 24;
        let strtab = a.secs.get(st.link).map_or(0, |t| t.offset);
        for k in 1..count.min(24) {
            let s = st.offset + 24 * k;
            let name_at = strtab + rd32(&a.bytes, s) as usize;
            let name_len = a.bytes[name_at..].iter().position(|&c| c == 0).unwrap_or(0);
            let name = String::from_utf8_lossy(&a.bytes[name_at..name_at + name_len]);
            let k = format!("{k} ({name})");
            let shndx = rd16(&a.bytes, s + 6);
            add(
                format!("sym {k} st_shndx=shnum+5"),
                a.crafted(|b| wr16(b, s + 6, a.shnum as u16 + 5)),
            );
            add(
                format!("sym {k} st_shndx=0xfeff"),
                a.crafted(|b| wr16(b, s + 6, 0xfeff)),
            );
            add(
                format!("sym {k} st_name=huge"),
                a.crafted(|b| wr32(b, s, 0xffff_fff0)),
            );
            if shndx != 0 && shndx < 0xff00 {
                let value = rd64(&a.bytes, s + 8);
                add(
                    format!("sym {k} st_value=huge"),
                    a.crafted(|b| wr64(b, s + 8, huge)),
                );
                add(
                    format!("sym {k} st_value+0x100000"),
                    a.crafted(|b| wr64(b, s + 8, value + 0x10_0000)),
                );
                add(
                    format!("sym {k} st_size=huge"),
                    a.crafted(|b| wr64(b, s + 16, huge)),
                );
            }
        }
    }

    // Relocations: symbol index, type, offset outside the section.
    for s in a.secs.iter().filter(|s| s.sh_type == 4) {
        let target_size = rd32(&a.bytes, s.hdr + 44) as usize;
        let target_size = a.secs.get(target_size).map_or(0, |t| t.size) as u64;
        for k in 0..(s.size / 24).min(12) {
            let r = s.offset + 24 * k;
            let info = rd64(&a.bytes, r + 8);
            let n = &s.name;
            add(
                format!("{n}[{k}] r_info sym=0xffffff"),
                a.crafted(|b| wr64(b, r + 8, (0xff_ffffu64 << 32) | (info & 0xffff_ffff))),
            );
            add(
                format!("{n}[{k}] r_info type=0xfe"),
                a.crafted(|b| wr64(b, r + 8, (info & !0xffff_ffff) | 0xfe)),
            );
            add(
                format!("{n}[{k}] r_offset=section size"),
                a.crafted(|b| wr64(b, r, target_size)),
            );
            add(
                format!("{n}[{k}] r_offset=size-1 (write spills past the end)"),
                a.crafted(|b| wr64(b, r, target_size.saturating_sub(1))),
            );
            add(
                format!("{n}[{k}] r_offset=huge"),
                a.crafted(|b| wr64(b, r, huge)),
            );
        }
    }

    // .kpatch.info records (48 bytes: daddr, saddr, dlen, slen, ...): huge and shifted.
    if let Some(ki) = a.sec(".kpatch.info") {
        for k in 0..(ki.size / 48).min(4) {
            let r = ki.offset + 48 * k;
            let daddr = rd64(&a.bytes, r);
            if daddr == 0 {
                continue;
            }
            for (what, v64) in [
                ("daddr=huge", huge),
                ("daddr+1", daddr + 1),
                ("daddr+16", daddr + 16),
                ("daddr-16", daddr.saturating_sub(16)),
            ] {
                add(
                    format!("kpatch.info[{k}] {what}"),
                    a.crafted(|b| wr64(b, r, v64)),
                );
            }
            for (what, at, v32) in [
                ("dlen=huge", 16usize, 0xffff_fff0u32),
                ("dlen=0", 16, 0),
                ("dlen=2", 16, 2),
                ("slen=huge", 20, 0xffff_fff0),
            ] {
                add(
                    format!("kpatch.info[{k}] {what}"),
                    a.crafted(|b| wr32(b, r + at, v32)),
                );
            }
        }
    }

    // `.kpatch.info` is filled by relocations (daddr = original function + addend,
    // saddr = patch code + addend): shifted addends must not move a jump off a
    // function start, nor make it jump into the void.
    if let Some(rk) = a.sec(".rela.kpatch.info") {
        for k in 0..rk.size / 24 {
            let r = rk.offset + 24 * k;
            let field = rd64(&a.bytes, r) % 48;
            let addend = rd64(&a.bytes, r + 16);
            let what = match field {
                0 => "daddr",
                8 => "saddr",
                _ => continue,
            };
            for (delta_name, v64) in [
                ("+1", addend.wrapping_add(1)),
                ("+16", addend.wrapping_add(16)),
                ("-16", addend.wrapping_sub(16)),
                ("+0x100000", addend.wrapping_add(0x10_0000)),
                ("=huge", huge),
            ] {
                add(
                    format!(".rela.kpatch.info[{k}] {what} addend{delta_name}"),
                    a.crafted(|b| wr64(b, r + 16, v64)),
                );
            }
        }
    }

    structural(a, &mut add);

    // Container header offsets.
    for (what, at, v32) in [
        ("kpatch_offset=huge", a.kpatch_offset_at, 0xffff_fff0u32),
        ("kpatch_offset=len", a.kpatch_offset_at, len as u32),
        ("total_size=huge", a.total_size_at, 0xffff_fff0),
        ("total_size=len-16", a.total_size_at, len as u32 - 16),
        ("rel_offset=huge", a.rel_offset_at, 0xffff_fff0),
    ] {
        add(what.into(), a.crafted(|b| wr32(b, at, v32)));
    }
    v
}

/// Structural forgeries (issue 16): every field in range, but sections, relocations and
/// symbols that do not fit together. A relocation section moved onto another section
/// (`sh_info`), sections retyped (`sh_type`: code as NOBITS, relocations as PROGBITS),
/// sections overlapping each other or the headers (`sh_offset`), symbols moved into
/// other sections (`st_shndx`) and data symbols that name the wrong place, size or type
/// of the target's symbol (`st_value`, `st_size`, `st_info`).
fn structural(a: &Anatomy, add: &mut impl FnMut(String, Vec<u8>)) {
    let index = |name: &str| a.secs.iter().position(|s| s.name == name);
    let interesting: Vec<(String, usize)> = [
        ".text",
        ".data",
        ".bss",
        ".symtab",
        ".shstrtab",
        ".eh_frame",
        ".kpatch.info",
        ".kpatch.text",
        ".kpatch.strtab",
    ]
    .iter()
    .filter_map(|n| Some((n.to_string(), index(n)?)))
    .collect();
    let shoff = rd64(&a.bytes, a.elf + 0x28);
    for (i, s) in a.secs.iter().enumerate().skip(1) {
        let (h, n) = (s.hdr, &s.name);
        if s.sh_type == 4 {
            let own = rd32(&a.bytes, h + 44) as usize;
            add(
                format!("[{i}] {n} sh_info=0"),
                a.crafted(|b| wr32(b, h + 44, 0)),
            );
            for (tn, t) in interesting.iter().filter(|(_, t)| *t != own) {
                add(
                    format!("[{i}] {n} sh_info={tn}"),
                    a.crafted(|b| wr32(b, h + 44, *t as u32)),
                );
            }
        }
        let with_data = s.sh_type != 8 && s.size > 0;
        if with_data || matches!(n.as_str(), ".text" | ".bss") {
            for (tn, t) in [("NOBITS", 8u32), ("PROGBITS", 1), ("NOTE", 7), ("RELA", 4)] {
                if t != s.sh_type {
                    add(
                        format!("[{i}] {n} sh_type={tn}"),
                        a.crafted(|b| wr32(b, h + 4, t)),
                    );
                }
            }
        }
        if with_data {
            let mut overlaps = vec![
                ("the ELF header".to_string(), 0u64),
                ("the section table".to_string(), shoff),
            ];
            for o in a
                .secs
                .iter()
                .filter(|o| o.sh_type != 8 && o.size > 0 && o.name != *n)
            {
                if matches!(o.name.as_str(), ".kpatch.text" | ".symtab" | ".kpatch.info") {
                    overlaps.push((o.name.clone(), (o.offset - a.elf) as u64));
                }
            }
            for (what, off) in overlaps {
                add(
                    format!("[{i}] {n} sh_offset over {what}"),
                    a.crafted(|b| wr64(b, h + 24, off)),
                );
            }
        }
    }
    let Some(st) = a.sec(".symtab") else { return };
    for k in 1..(st.size / 24).min(24) {
        let s = st.offset + 24 * k;
        let shndx = rd16(&a.bytes, s + 6) as usize;
        for (tn, t) in interesting.iter().filter(|(_, t)| *t != shndx) {
            add(
                format!("sym {k} st_shndx moved to {tn}"),
                a.crafted(|b| wr16(b, s + 6, *t as u16)),
            );
        }
        let info = a.bytes[s + 4];
        let placeholder = a.secs.get(shndx).is_some_and(|t| t.sh_type == 8);
        if shndx == 0 || info & 0xf == 3 || !placeholder {
            continue;
        }
        // A data symbol of the target's own sections at another place, size or type.
        let value = rd64(&a.bytes, s + 8);
        let size = rd64(&a.bytes, s + 16);
        for (what, v) in [("-4", value.wrapping_sub(4)), ("+4", value + 4)] {
            add(
                format!("sym {k} st_value{what} (inside its section)"),
                a.crafted(|b| wr64(b, s + 8, v)),
            );
        }
        add(
            format!("sym {k} st_size+4"),
            a.crafted(|b| wr64(b, s + 16, size + 4)),
        );
        for (what, t) in [("NOTYPE", 0u8), ("OBJECT", 1), ("FUNC", 2)] {
            if info & 0xf != t {
                add(
                    format!("sym {k} st_type={what}"),
                    a.crafted(|b| b[s + 4] = (info & 0xf0) | t),
                );
            }
        }
    }
}

/// The header-level variants that need the builder: a LibCare-layout re-wrap with a
/// 256-byte unterminated build-id, a forged build-id and a patch for another binary.
fn special_cases(
    a: &Anatomy,
    b: &Builder,
    own: &Patch,
    other: &Patch,
    dir: &Path,
) -> Result<Vec<Case>> {
    let mut v = Vec::new();
    // LibCare layout: `uname[256]` filled with hex digits, no NUL.
    let elf = std::fs::read(&own.elf)?;
    let bid =
        kpatch_file::BuildId::parse(&own.build_id).map_err(|e| anyhow::anyhow!("build-id: {e}"))?;
    let lc = kpatch_file::make_with(
        &elf,
        &bid,
        None,
        &kpatch_file::MakeOptions {
            layout: Layout::LibCare,
            build_time: 0,
            checksum: false,
        },
    )?;
    let uname = offset_of!(LibCareHeader, uname);
    let mut unterminated = lc.clone();
    for (i, c) in unterminated[uname..uname + 256].iter_mut().enumerate() {
        *c = b"0123456789abcdef"[i % 16];
    }
    v.push(Case {
        name: "LibCare layout, 256-byte unterminated build-id".into(),
        bytes: unterminated,
    });
    let mut own_prefix = lc.clone();
    let id = own.build_id.as_bytes();
    for (i, c) in own_prefix[uname..uname + 256].iter_mut().enumerate() {
        *c = id[i % id.len()];
    }
    v.push(Case {
        name: "LibCare layout, build-id repeated over 256 bytes".into(),
        bytes: own_prefix,
    });
    // A forged build-id: this target's id, another binary's patch.
    let forged = dir.join("forged.kpatch");
    b.make(&other.elf, &own.build_id, "0001", &forged)?;
    v.push(Case {
        name: "forged build-id (other binary's patch)".into(),
        bytes: std::fs::read(&forged)?,
    });
    v.push(Case {
        name: "patch for another binary".into(),
        bytes: std::fs::read(&other.path)?,
    });
    // The build-id with one digit changed, checksum intact.
    let mut wrong = a.bytes.clone();
    let at = wrong
        .windows(own.build_id.len())
        .position(|w| w == own.build_id.as_bytes())
        .context("build-id in header")?;
    wrong[at] = if wrong[at] == b'0' { b'1' } else { b'0' };
    v.push(Case {
        name: "build-id off by one digit".into(),
        bytes: wrong,
    });
    Ok(v)
}

/// A two-hunk patch whose second record is made to replace the first record's function
/// too (same daddr symbol and addend, name and length), with its own body or with the
/// first one's: a function replaced twice (issue 16 item 3).
fn duplicate_hunks(two: &Path) -> Result<Vec<Case>> {
    let original = std::fs::read(two)?;
    let pf = PatchFile::parse(&original).context("the two-hunk patch parses")?;
    let view = pf.elf_view();
    let elf = pf.header().kpatch_offset as usize;
    let info = view
        .section_by_name(".kpatch.info")
        .context("no .kpatch.info")?;
    let rel = view
        .relocation_sections()
        .iter()
        .find(|r| r.target == info.index)
        .context("no .rela.kpatch.info")?;
    let rel_off = elf + view.section(rel.section).context("rela")?.offset as usize;
    let entry = |rec: u64, field: u64| {
        rel.entries
            .iter()
            .position(|e| e.offset == rec * 48 + field)
            .context("record without relocation")
    };
    let rec_off = elf + info.offset as usize;
    let mut v = Vec::new();
    for (what, fields) in [
        ("other body", &[0u64, 24][..]),
        ("same body", &[0u64, 8, 24][..]),
    ] {
        let mut b = original.clone();
        for field in fields {
            let (from, to) = (entry(0, *field)?, entry(1, *field)?);
            let (src, dst) = (rel_off + from * 24, rel_off + to * 24);
            let info_and_addend = b[src + 8..src + 24].to_vec();
            b[dst + 8..dst + 24].copy_from_slice(&info_and_addend);
        }
        let dlen = b[rec_off + 16..rec_off + 20].to_vec();
        b[rec_off + 48 + 16..rec_off + 48 + 20].copy_from_slice(&dlen);
        let csum_at = offset_of!(LibCarePlusHeader, csum);
        let crc = kpatch_file::crc32(&b[elf..pf.header().total_size as usize]);
        wr32(&mut b, csum_at, crc);
        v.push(Case {
            name: format!("duplicate hunk: record 1 replaces record 0's function ({what})"),
            bytes: b,
        });
    }
    Ok(v)
}

/// Outcome of one livecare run./// Outcome of one livecare run.
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs livecare with output in files (no pipe can fill) and a hang limit.
fn run_livecare(args: &[&std::ffi::OsStr], out_dir: &Path) -> Result<Run> {
    use std::os::unix::process::ExitStatusExt;
    let o = out_dir.join("stdout");
    let e = out_dir.join("stderr");
    let mut child = Command::new(LIVECARE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&o)?)
        .stderr(File::create(&e)?)
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("livecare {args:?} hung for {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(Run {
        code: status.code(),
        signal: status.signal(),
        stdout: std::fs::read_to_string(&o).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&std::fs::read(&e).unwrap_or_default()).into_owned(),
    })
}

/// The target is alive and none of its threads is stopped or traced.
fn assert_clean(p: &mut Running) -> Result<()> {
    ensure!(p.is_alive(), "target died; last lines {:?}", p.tail(5));
    let pid = p.pid();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let t = e?.file_name();
        let Ok(status) =
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", t.to_string_lossy()))
        else {
            continue;
        };
        for l in status.lines() {
            if let Some(s) = l.strip_prefix("State:") {
                let s = s.trim();
                ensure!(
                    !s.starts_with('t') && !s.starts_with('T'),
                    "thread {t:?} left {s}"
                );
            }
            if let Some(s) = l.strip_prefix("TracerPid:") {
                ensure!(s.trim() == "0", "thread {t:?} still traced by {}", s.trim());
            }
        }
    }
    Ok(())
}

/// Waits for a fresh output line of the target and checks it is one of `ok`.
fn fresh_line(p: &mut Running, ok: &[&str]) -> Result<String> {
    p.drain();
    let line = p.wait_for("t0 value=", WAIT)?;
    ensure!(
        ok.iter().any(|o| line == *o),
        "target prints {line:?}, expected one of {ok:?}"
    );
    Ok(line)
}

const BEFORE: &str = "t0 value=1 msg=hello";
const AFTER: &str = "t0 value=2 msg=hello";

/// What happened to one case.
enum Verdict {
    Rejected,
    Applied,
}

/// Runs one case against the target and checks every promise; `Err` is a violation.
fn check_case(p: &mut Running, base: &MemorySnapshot, file: &Path, work: &Path) -> Result<Verdict> {
    let pid = p.pid().to_string();
    let r = run_livecare(
        &[
            "patch".as_ref(),
            "-p".as_ref(),
            pid.as_ref(),
            file.as_os_str(),
        ],
        work,
    )?;
    ensure!(
        r.signal.is_none(),
        "livecare died of signal {:?}\nstderr:\n{}",
        r.signal,
        r.stderr
    );
    ensure!(
        !r.stderr.contains("panicked"),
        "livecare panicked:\n{}",
        r.stderr
    );
    match r.code {
        Some(1) => {
            ensure!(
                r.stderr.contains("error"),
                "exit 1 without an error message: {}",
                r.stderr
            );
            assert_clean(p)?;
            // Regions of variants applied and removed before stay retired until a
            // few have piled up (see `reclaim`).
            MemorySnapshot::take(p.pid())?
                .assert_same_except(base, &common::retired_ranges(p.pid())?)
                .with_context(|| {
                    format!("target changed by a rejected file ({})", r.stderr.trim())
                })?;
            Ok(Verdict::Rejected)
        }
        Some(0) => {
            assert_clean(p).context("after a successful patch")?;
            fresh_line(p, &[BEFORE, AFTER]).context("output after a successful patch")?;
            let u = run_livecare(&["unpatch".as_ref(), "-p".as_ref(), pid.as_ref()], work)?;
            ensure!(
                u.code == Some(0),
                "unpatch after an accepted variant exited {:?}/{:?}:\n{}",
                u.code,
                u.signal,
                u.stderr
            );
            // The first lines after a drain can still be patched ones, printed before
            // the unpatch; after the first original line, only original ones.
            p.drain();
            p.settle(3, WAIT, |l| {
                Ok(match l {
                    BEFORE => Seen::Final,
                    AFTER => Seen::Transitional,
                    l if l.starts_with("t0 value=") => bail!("expected {BEFORE:?}"),
                    _ => Seen::Ignore,
                })
            })
            .context("output after unpatch")?;
            assert_clean(p)?;
            MemorySnapshot::take(p.pid())?
                .assert_same_except(base, &common::retired_ranges(p.pid())?)
                .context("target after unpatch of an accepted variant")?;
            Ok(Verdict::Applied)
        }
        c => bail!(
            "livecare exited {c:?} (want 0 or 1)\nstdout:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        ),
    }
}

/// Keeps the file of a failing case where a human can find it.
fn keep(file: &Path, found: &Path, index: usize, name: &str) -> PathBuf {
    let _ = std::fs::create_dir_all(found);
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dest = found.join(format!("{index:03}-{safe}.kpatch"));
    let _ = std::fs::copy(file, &dest);
    dest
}

#[test]
fn hostile_patch_files_never_crash_livecare_nor_touch_the_target() -> Result<()> {
    let t0 = Instant::now();
    let dir = Scratch::new()?;
    let flags = Flags {
        exe_link: Link::Pie,
        opt: "-O2".into(),
        ..Flags::default()
    };
    let b = Builder::new(
        Path::new(LIVECARE),
        &fixture_dir("scenario-exe"),
        &dir.join("build"),
        flags,
    )?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let own = b.patch(&exe, "patched-basic.c", "0001")?;
    // Another binary from the same source: same function names, other addresses.
    let b_other = Builder::new(
        Path::new(LIVECARE),
        &fixture_dir("scenario-exe"),
        &dir.join("build-other"),
        Flags {
            exe_link: Link::Pie,
            opt: "-O0".into(),
            ..Flags::default()
        },
    )?;
    let other_exe = b_other.executable("orig.c", "prog", &[])?;
    ensure!(
        other_exe.build_id != exe.build_id,
        "the other binary has its own build-id"
    );
    let other = b_other.patch(&other_exe, "patched-basic.c", "0001")?;
    // Two hunks (value() and message()), for the duplicate-hunk forgeries.
    let two = b.patch(&exe, "patched-two.c", "0002")?;
    let build_time = t0.elapsed();

    let a = Anatomy::new(std::fs::read(&own.path)?)?;
    let mut cases = corpus(&a);
    cases.extend(special_cases(&a, &b, &own, &other, dir.path())?);
    cases.extend(duplicate_hunks(&two.path)?);
    ensure!(cases.len() >= 200, "only {} hostile files", cases.len());

    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for(BEFORE, WAIT)?;
    // Control: the pristine file applies and unpatches cleanly under the same checks,
    // so the harness can see success.
    let base = MemorySnapshot::take(p.pid())?;
    let work = dir.join("runs");
    std::fs::create_dir_all(&work)?;
    match check_case(&mut p, &base, &own.path, &work)? {
        Verdict::Applied => {}
        Verdict::Rejected => bail!("the valid patch was rejected"),
    }

    let file = dir.join("case.kpatch");
    // HOSTILE_KEEP=<dir> keeps the target, the patch and every failing file there.
    let found = match std::env::var_os("HOSTILE_KEEP") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d)?;
            std::fs::copy(&exe.path, d.join("prog"))?;
            std::fs::copy(&own.path, d.join("valid.kpatch"))?;
            std::fs::copy(&own.elf, d.join("valid-patch.elf"))?;
            d
        }
        None => dir.join("found"),
    };
    let (mut rejected, mut applied) = (0usize, 0usize);
    let mut applied_names = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut known: BTreeMap<String, String> = BTreeMap::new();
    let mut base = base;
    let t_run = Instant::now();
    for (index, c) in cases.iter().enumerate() {
        std::fs::write(&file, &c.bytes)?;
        match check_case(&mut p, &base, &file, &work) {
            Ok(Verdict::Rejected) => rejected += 1,
            Ok(Verdict::Applied) => {
                applied += 1;
                applied_names.push(c.name.clone());
            }
            Err(e) => {
                let kept = keep(&file, &found, index, &c.name);
                let msg = format!("{}: {e:#} (file kept at {})", c.name, kept.display());
                if let Some((_, why)) = KNOWN_BUGS.iter().find(|(n, _)| *n == c.name) {
                    eprintln!("KNOWN BUG: {msg}\n  ({why})");
                    known.insert(c.name.clone(), msg);
                } else {
                    eprintln!("VIOLATION: {msg}");
                    failures.push(msg);
                }
                // A broken target makes every later case meaningless: start afresh.
                if assert_clean(&mut p).is_err() || p.wait_for("t0 value=", WAIT).is_err() {
                    p = Running::start(&exe.path, &[])?;
                    p.wait_for(BEFORE, WAIT)?;
                } else {
                    let _ = run_livecare(
                        &[
                            "unpatch".as_ref(),
                            "-p".as_ref(),
                            p.pid().to_string().as_ref(),
                        ],
                        &work,
                    );
                }
                base = MemorySnapshot::take(p.pid())?;
            }
        }
    }
    let run_time = t_run.elapsed();
    eprintln!(
        "hostile corpus: {} files, {rejected} rejected, {applied} valid-applied, {} violations, {} known bugs; build {build_time:.1?}, runs {run_time:.1?} ({:.1?} per file)",
        cases.len(),
        failures.len(),
        known.len(),
        run_time / cases.len() as u32
    );
    for n in &applied_names {
        eprintln!("  accepted as valid: {n}");
    }
    for (n, _) in KNOWN_BUGS.iter().filter(|(n, _)| !known.contains_key(*n)) {
        eprintln!("KNOWN BUG no longer reproduces (remove it from KNOWN_BUGS): {n}");
    }
    for (n, m) in &known {
        eprintln!("KNOWN BUG (not failing CI): {n}: {m}");
    }
    ensure!(
        failures.is_empty(),
        "{} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// The files in tests/fixtures/hostile-found/ (each once accepted, most then killing
/// the target) against the prebuilt target `prog` they were made for: every one must
/// be rejected with exit 1 and an error naming the problem, the target unchanged,
/// running and untraced; `valid.kpatch`, the file they were derived from, still applies
/// and unpatches cleanly.
#[test]
fn found_hostile_files_are_rejected_before_touching_the_target() -> Result<()> {
    let found = fixture_dir("hostile-found");
    let dir = Scratch::new()?;
    // Run in place: a fresh copy could still be open for writing in a child another
    // test thread is forking (ETXTBSY).
    let prog = found.join("prog");
    let mut p = Running::start(&prog, &[])?;
    p.wait_for(BEFORE, WAIT)?;
    let mut base = MemorySnapshot::take(p.pid())?;
    let work = dir.join("runs");
    std::fs::create_dir_all(&work)?;
    // What each rejection must say, so a file is refused for its own defect.
    let expect: &[(&str, &str)] = &[
        ("sym-ticks-st_value-plus-1MiB.kpatch", "lies outside .bss"),
        ("sym-ticks-st_value-huge.kpatch", "lies outside .bss"),
        ("saddr-addend-plus-1.kpatch", "not the start of a function"),
        ("saddr-addend-plus-16.kpatch", "not the start of a function"),
        ("saddr-addend-minus-16.kpatch", "not in the patch"),
        ("saddr-addend-huge.kpatch", "not in the patch"),
        (
            "kpatch-info-slen-past-kpatch-text.kpatch",
            "runs past the end",
        ),
        ("daddr-addend-plus-1.kpatch", "no function starts there"),
        (
            "rela-kpatch-text-r_offset-spills-past-end.kpatch",
            "past end of target section",
        ),
    ];
    let mut files: Vec<String> = std::fs::read_dir(&found)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".kpatch") && n != "valid.kpatch")
        .collect();
    files.sort();
    ensure!(
        files.len() == expect.len(),
        "hostile-found has {files:?}, the test expects {:?}",
        expect.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    let mut failures = Vec::new();
    for (f, why) in expect {
        let pid = p.pid().to_string();
        let file = found.join(f);
        let r = run_livecare(
            &[
                "patch".as_ref(),
                "-p".as_ref(),
                pid.as_ref(),
                file.as_os_str(),
            ],
            &work,
        )?;
        let outcome = if r.code == Some(1) && r.signal.is_none() && r.stderr.contains(why) {
            assert_clean(&mut p).and_then(|()| {
                MemorySnapshot::take(p.pid())?
                    .assert_same(&base)
                    .context("target changed by a rejected file")
            })
        } else {
            Err(anyhow::anyhow!(
                "exit {:?} signal {:?}, stderr {:?} (want exit 1 and {why:?})",
                r.code,
                r.signal,
                r.stderr.trim()
            ))
        };
        match outcome {
            Ok(()) => eprintln!("{f}: rejected: {}", r.stderr.trim()),
            Err(e) => {
                failures.push(format!("{f}: {e:#}"));
                // Start afresh so the next file meets a pristine target.
                if r.code == Some(0) || !p.is_alive() {
                    drop(p);
                    p = Running::start(&prog, &[])?;
                    p.wait_for(BEFORE, WAIT)?;
                    base = MemorySnapshot::take(p.pid())?;
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    match check_case(&mut p, &base, &found.join("valid.kpatch"), &work)? {
        Verdict::Applied => Ok(()),
        Verdict::Rejected => bail!("valid.kpatch was rejected"),
    }
}

/// Crashes the fuzzers found (fuzz/crashes/), replayed through the CLI: each must fail
/// with exit 1 and a message, never a panic. Sub-cases listed in `KNOWN_FUZZ_BUGS` are
/// reported loudly but do not fail CI.
const KNOWN_FUZZ_BUGS: &[(&str, &str)] = &[];

#[test]
fn fuzz_found_inputs_fail_cleanly_in_the_cli() -> Result<()> {
    let dir = Scratch::new()?;
    let crashes = testkit::repo_root().join("fuzz/crashes");
    let seeds = testkit::repo_root().join("fuzz/seeds");
    let mut failures = Vec::new();
    let mut cases: Vec<(String, Vec<std::ffi::OsString>)> = Vec::new();
    for e in std::fs::read_dir(crashes.join("asm_parse"))? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        cases.push((
            format!("gensrc {name}"),
            vec![
                "gensrc".into(),
                "-i".into(),
                p.clone().into(),
                "-i".into(),
                p.into(),
                "-o".into(),
                dir.join("out.s").into(),
            ],
        ));
    }
    for e in std::fs::read_dir(crashes.join("patch_elf"))? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        // The first byte picks the fuzz target's role: even = the bytes are the patch.
        let bytes = std::fs::read(&p)?;
        let Some((role, rest)) = bytes.split_first() else {
            continue;
        };
        let (orig, patch) = if role & 1 == 0 {
            (
                seeds.join("orig-prog"),
                dir.write(&format!("{name}.elf"), rest)?,
            )
        } else {
            (
                dir.write(&format!("{name}.orig"), rest)?,
                dir.write(
                    &format!("{name}.elf"),
                    std::fs::read(seeds.join("patch-unneeded.elf"))?,
                )?,
            )
        };
        for step in ["--rel-fixup", "--undo-link"] {
            let work = dir.join(format!("{name}{step}.elf"));
            std::fs::copy(&patch, &work)?;
            cases.push((
                format!("strip {step} {name}"),
                vec![
                    "strip".into(),
                    step.into(),
                    orig.clone().into(),
                    work.into(),
                ],
            ));
        }
        let work = dir.join(format!("{name}-strip.elf"));
        cases.push((
            format!("strip --strip {name}"),
            vec![
                "strip".into(),
                "--strip".into(),
                patch.clone().into(),
                work.into(),
            ],
        ));
    }
    ensure!(
        !cases.is_empty(),
        "no fuzz crash files found in {}",
        crashes.display()
    );
    let mut known = 0;
    for (name, args) in &cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let r = run_livecare(&args, dir.path())?;
        let ok = r.signal.is_none()
            && !r.stderr.contains("panicked")
            && matches!(r.code, Some(0) | Some(1))
            && (r.code == Some(0) || r.stderr.contains("error"));
        if ok {
            continue;
        }
        let msg = format!(
            "livecare {args:?}: exit {:?} signal {:?}\n{}",
            r.code,
            r.signal,
            r.stderr.lines().take(3).collect::<Vec<_>>().join("\n")
        );
        if let Some((_, why)) = KNOWN_FUZZ_BUGS.iter().find(|(n, _)| n == name) {
            eprintln!("KNOWN BUG: {name}: {msg}\n  ({why})");
            known += 1;
        } else {
            eprintln!("VIOLATION: {name}: {msg}");
            failures.push(format!("{name}: {msg}"));
        }
    }
    eprintln!(
        "fuzz crashes replayed: {} runs, {known} known bugs, {} violations",
        cases.len(),
        failures.len()
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
