//! Corrupted containers derived from the peers' real files: each corruption gives its
//! own readable error naming the field and offset, and nothing ever panics.

use std::collections::HashSet;

use kpatch_file::inspect::Report;
use kpatch_file::{Error, PatchFile};
use proptest::prelude::*;

fn interop(name: &str) -> Vec<u8> {
    let dir = testkit::interop_dir().expect("../shared/interop is missing");
    let scratch = testkit::Scratch::new().unwrap();
    let copy = scratch.join(name);
    std::fs::copy(dir.join(name), &copy).unwrap();
    std::fs::read(copy).unwrap()
}

/// Offset of the ELF in the LibcarePlus file.
const BASE: usize = 504;

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}
/// Absolute offset of section header `i` plus `field`.
fn sh(b: &[u8], i: usize, field: usize) -> usize {
    BASE + get_u64(b, BASE + 40) as usize + i * 64 + field
}
/// Absolute offset of symbol `j` of the `.symtab` (section 41) plus `field`.
fn sym(b: &[u8], j: usize, field: usize) -> usize {
    BASE + get_u64(b, sh(b, 41, 24)) as usize + j * 24 + field
}
/// Absolute offset of entry `k` of `.rela.kpatch.text` (section 19) plus `field`.
fn rela(b: &[u8], k: usize, field: usize) -> usize {
    BASE + get_u64(b, sh(b, 19, 24)) as usize + k * 24 + field
}

type Corrupt = fn(&mut Vec<u8>);

/// (what, file, corruption, expected kind, expected field or field prefix ending in `*`)
fn cases() -> Vec<(
    &'static str,
    &'static str,
    Corrupt,
    &'static str,
    &'static str,
)> {
    const PLUS: &str = "foo.libcareplus.kpatch";
    const LC: &str = "foo.libcare.kpatch";
    vec![
        (
            "truncated in magic",
            PLUS,
            |b| b.truncate(4),
            "truncated",
            "header.magic",
        ),
        (
            "truncated in patch id",
            PLUS,
            |b| b.truncate(12),
            "truncated",
            "header.id",
        ),
        (
            "truncated in modulename",
            PLUS,
            |b| b.truncate(60),
            "truncated",
            "header.modulename",
        ),
        (
            "truncated in buildid",
            PLUS,
            |b| b.truncate(100),
            "truncated",
            "header.buildid",
        ),
        (
            "truncated in build_time",
            LC,
            |b| b.truncate(340),
            "truncated",
            "header.build_time",
        ),
        (
            "truncated in nr_reloc",
            PLUS,
            |b| b.truncate(150),
            "truncated",
            "header.nr_reloc",
        ),
        (
            "truncated in kpatch_offset",
            PLUS,
            |b| b.truncate(154),
            "truncated",
            "header.kpatch_offset",
        ),
        (
            "truncated in total_size",
            LC,
            |b| b.truncate(362),
            "truncated",
            "header.total_size",
        ),
        (
            "truncated in entries",
            PLUS,
            |b| b.truncate(200),
            "truncated",
            "header.entries[4]",
        ),
        (
            "truncated in srcversion",
            PLUS,
            |b| b.truncate(260),
            "truncated",
            "header.srcversion",
        ),
        (
            "truncated in the ELF",
            PLUS,
            |b| b.truncate(5000),
            "past-end",
            "header.total_size",
        ),
        (
            "bad magic",
            PLUS,
            |b| b[0] = b'X',
            "bad-magic",
            "header.magic",
        ),
        (
            "kpatch_offset past EOF",
            PLUS,
            |b| put(b, 152, &16384u32.to_le_bytes()),
            "past-end",
            "header.kpatch_offset",
        ),
        (
            "kpatch_offset inside header",
            LC,
            |b| put(b, 352, &504u32.to_le_bytes()),
            "invalid",
            "header.kpatch_offset",
        ),
        (
            "total_size short of file",
            PLUS,
            |b| put(b, 160, &8000u32.to_le_bytes()),
            "invalid",
            "header.total_size",
        ),
        (
            "rel_offset past total_size",
            PLUS,
            |b| put(b, 156, &9000u32.to_le_bytes()),
            "past-end",
            "header.rel_offset",
        ),
        (
            "unterminated 256-byte build-id",
            LC,
            |b| b[80..336].fill(b'a'),
            "unterminated",
            "header.uname",
        ),
        (
            "odd-length build-id",
            PLUS,
            |b| b[127] = 0,
            "invalid",
            "header.buildid",
        ),
        (
            "no build-id at either offset",
            PLUS,
            |b| b[80..129].fill(0),
            "unknown-layout",
            "header",
        ),
        (
            "unterminated patch id",
            PLUS,
            |b| b[8..16].fill(b'1'),
            "unterminated",
            "header.id",
        ),
        (
            "bad ELF magic",
            PLUS,
            |b| b[BASE + 1] = b'X',
            "bad-magic",
            "elf.e_ident[EI_MAG]",
        ),
        (
            "32-bit class",
            PLUS,
            |b| b[BASE + 4] = 1,
            "unsupported",
            "elf.e_ident[EI_CLASS]",
        ),
        (
            "big endian",
            PLUS,
            |b| b[BASE + 5] = 2,
            "unsupported",
            "elf.e_ident[EI_DATA]",
        ),
        (
            "ET_EXEC instead of ET_REL",
            PLUS,
            |b| b[BASE + 16] = 2,
            "unsupported",
            "elf.e_type",
        ),
        (
            "machine i386",
            PLUS,
            |b| b[BASE + 18] = 3,
            "unsupported",
            "elf.e_machine",
        ),
        (
            "e_shoff past EOF",
            PLUS,
            |b| put(b, BASE + 40, &0x10_0000u64.to_le_bytes()),
            "past-end",
            "elf.e_shoff",
        ),
        (
            "e_shnum 0xffff",
            PLUS,
            |b| put(b, BASE + 60, &0xffffu16.to_le_bytes()),
            "invalid",
            "elf.e_shnum",
        ),
        (
            "e_shstrndx out of range",
            PLUS,
            |b| put(b, BASE + 62, &60u16.to_le_bytes()),
            "bad-index",
            "elf.e_shstrndx",
        ),
        (
            "e_shstrndx SHN_XINDEX with bad sh_link",
            PLUS,
            |b| {
                put(b, BASE + 62, &0xffffu16.to_le_bytes());
                let at = sh(b, 0, 40);
                put(b, at, &0u32.to_le_bytes());
            },
            "bad-index",
            "section[0].sh_link",
        ),
        (
            "section offset past EOF",
            PLUS,
            |b| {
                let at = sh(b, 18, 24);
                put(b, at, &0x10_0000u64.to_le_bytes());
            },
            "past-end",
            "section[18].sh_offset",
        ),
        (
            "huge sh_size",
            PLUS,
            |b| {
                let at = sh(b, 18, 32);
                put(b, at, &(u64::MAX - 8).to_le_bytes());
            },
            "past-end",
            "section[18].sh_size",
        ),
        (
            "bad sh_link",
            PLUS,
            |b| {
                let at = sh(b, 19, 40);
                put(b, at, &200u32.to_le_bytes());
            },
            "bad-index",
            "section[19].sh_link",
        ),
        (
            "bad sh_info of a RELA",
            PLUS,
            |b| {
                let at = sh(b, 24, 44);
                put(b, at, &45u32.to_le_bytes());
            },
            "bad-index",
            "section[24].sh_info",
        ),
        (
            "bad sh_name",
            PLUS,
            |b| {
                let at = sh(b, 18, 0);
                put(b, at, &0x7fffu32.to_le_bytes());
            },
            "bad-index",
            "section[18].sh_name",
        ),
        (
            "unterminated section name",
            PLUS,
            |b| {
                // Cut .shstrtab just inside the name of the section whose name comes last.
                let last = (0..44).max_by_key(|&i| get_u32(b, sh(b, i, 0))).unwrap();
                let name = get_u32(b, sh(b, last, 0)) as u64;
                let at = sh(b, 43, 32);
                put(b, at, &(name + 2).to_le_bytes());
            },
            "unterminated",
            "section[*].sh_name",
        ),
        (
            "symtab sh_entsize 16",
            PLUS,
            |b| {
                let at = sh(b, 41, 56);
                put(b, at, &16u64.to_le_bytes());
            },
            "invalid",
            "section[41].sh_entsize",
        ),
        (
            "bad st_name",
            PLUS,
            |b| {
                let at = sym(b, 7, 0);
                put(b, at, &0xffffu32.to_le_bytes());
            },
            "bad-index",
            "section[41].sym[7].st_name",
        ),
        (
            "unterminated symbol name",
            PLUS,
            |b| {
                // Cut .strtab inside the symbol name that comes last.
                let last = (0..9).max_by_key(|&j| get_u32(b, sym(b, j, 0))).unwrap();
                let name = get_u32(b, sym(b, last, 0)) as u64;
                let at = sh(b, 42, 32);
                put(b, at, &(name + 2).to_le_bytes());
            },
            "unterminated",
            "section[41].sym[*].st_name",
        ),
        (
            "bad st_shndx",
            PLUS,
            |b| {
                let at = sym(b, 7, 6);
                put(b, at, &300u16.to_le_bytes());
            },
            "bad-index",
            "section[41].sym[7].st_shndx",
        ),
        (
            "relocation symbol out of range",
            PLUS,
            |b| {
                let at = rela(b, 0, 8);
                put(b, at, &((999u64 << 32) | 2).to_le_bytes());
            },
            "bad-index",
            "section[19].rela[0].r_info",
        ),
        (
            "relocation offset past its section",
            PLUS,
            |b| {
                let at = rela(b, 0, 0);
                put(b, at, &0x48u64.to_le_bytes());
            },
            "past-end",
            "section[19].rela[0].r_offset",
        ),
    ]
}

fn field_matches(pattern: &str, field: &str) -> bool {
    match pattern.split_once('*') {
        Some((pre, post)) => field.starts_with(pre) && field.ends_with(post),
        None => pattern == field,
    }
}

#[test]
fn every_corruption_gives_its_own_readable_error() {
    testkit::needs_interop!();
    let originals = [
        ("foo.libcareplus.kpatch", interop("foo.libcareplus.kpatch")),
        ("foo.libcare.kpatch", interop("foo.libcare.kpatch")),
    ];
    let mut seen = HashSet::new();
    let cases = cases();
    assert!(cases.len() >= 15);
    for (what, file, corrupt, kind, field) in cases {
        let mut bytes = originals
            .iter()
            .find(|(n, _)| *n == file)
            .unwrap()
            .1
            .clone();
        corrupt(&mut bytes);
        let err: Error = match PatchFile::parse(&bytes) {
            Ok(_) => panic!("{what}: corrupted file accepted"),
            Err(e) => e,
        };
        eprintln!("{what}: {err}");
        let got_field = err.field().unwrap_or("");
        assert_eq!(err.kind(), kind, "{what}: {err}");
        assert!(
            field_matches(field, got_field),
            "{what}: expected field {field}, got {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(got_field) || kind == "unknown-layout",
            "{what}: {msg}"
        );
        assert!(
            msg.contains(" at 0x"),
            "{what}: message has no offset: {msg}"
        );
        assert!(
            seen.insert((kind, got_field.to_string())),
            "{what}: same error as another case: {msg}"
        );
    }
}

#[test]
fn error_message_names_field_offset_and_sizes() {
    testkit::needs_interop!();
    let mut bytes = interop("foo.libcareplus.kpatch");
    bytes[152..156].copy_from_slice(&16384u32.to_le_bytes());
    let err = PatchFile::parse(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "header.kpatch_offset at 0x98: 16384 is past end of file (8360 bytes)"
    );
}

#[test]
fn every_truncation_of_a_real_file_is_an_error() {
    testkit::needs_interop!();
    for name in ["foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        let bytes = interop(name);
        for len in 0..bytes.len() {
            let err = PatchFile::parse(&bytes[..len]).expect_err("truncated file accepted");
            assert!(err.field().is_some(), "{name}[..{len}]: {err}");
        }
    }
}

/// Parses and, when valid, builds and renders the report (the fuzz target's work).
fn exercise(bytes: &[u8]) {
    if let Ok(file) = PatchFile::parse(bytes) {
        let report = Report::new(&file);
        let _ = report.to_string();
    }
}

thread_local! {
    /// The two peer files, read once per test thread.
    static FILES: [Vec<u8>; 2] = [interop("foo.libcare.kpatch"), interop("foo.libcareplus.kpatch")];
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_mutations_never_panic(
        plus in any::<bool>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        testkit::needs_interop!();
        let mut bytes = FILES.with(|f| f[usize::from(plus)].clone());
        for (at, value, how) in edits {
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = value,
                1 => bytes[i] ^= 1 << (value % 8),
                2 => {
                    // A 32-bit value that is likely to be an interesting size/index.
                    let v = [0u32, 1, 0xff, 0xffff, 0xffff_ffff, u32::from(value) << 8][usize::from(value % 6)];
                    let end = (i + 4).min(bytes.len());
                    bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
                _ => bytes[i] = 0,
            }
        }
        if let Some(cut) = cut {
            let n = cut.index(bytes.len() + 1);
            bytes.truncate(n);
        }
        exercise(&bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(tail in prop::collection::vec(any::<u8>(), 0..2048)) {
        testkit::needs_interop!();
        let mut bytes = FILES.with(|f| f[1][..504].to_vec());
        bytes.extend_from_slice(&tail);
        let total = bytes.len() as u32;
        bytes[160..164].copy_from_slice(&total.to_le_bytes());
        exercise(&bytes);
    }
}
