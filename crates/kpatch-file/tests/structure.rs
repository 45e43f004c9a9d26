//! Structural forgeries (issue 16): files whose every field is in range but whose
//! sections, relocations, symbols or `.kpatch.info` records do not fit together, so an
//! applier that trusted them would skip relocations, run zeros or write into its own
//! code. Each is refused naming the field and its offset; the peers' real files still
//! parse.

use kpatch_file::elf::ElfView;
use kpatch_file::inspect::Report;
use kpatch_file::PatchFile;
use object::write::{Object, StandardSection};
use object::{Architecture, BinaryFormat, Endianness, SectionKind};

fn interop(name: &str) -> Vec<u8> {
    let dir = testkit::interop_dir().expect("../shared/interop is missing");
    std::fs::read(dir.join(name)).unwrap()
}

/// Offset of the ELF in the LibcarePlus file.
const BASE: usize = 504;
const TEXT: u32 = 16;
const KPATCH_TEXT: usize = 18;
const RELA_KPATCH_TEXT: usize = 19;
const KPATCH_INFO: u32 = 23;
const EH_FRAME: u32 = 26;
const DATA: u32 = 35;
const KPATCH_DATA: u16 = 38;
const BSS: u32 = 39;
const SYMTAB: usize = 41;
const SHSTRTAB: u32 = 43;

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
/// Absolute offset of section header `i` plus `field`.
fn sh(b: &[u8], i: usize, field: usize) -> usize {
    BASE + u64_at(b, BASE + 40) as usize + i * 64 + field
}
fn sym(b: &[u8], j: usize, field: usize) -> usize {
    BASE + u64_at(b, sh(b, SYMTAB, 24)) as usize + j * 24 + field
}

/// Parses `b` after `f`, expecting an error on `field` (`*` matches any run of
/// characters, e.g. `section[*].sh_offset`); returns the message.
fn refused(what: &str, f: impl FnOnce(&mut Vec<u8>), field: &str) -> String {
    let mut b = interop("foo.libcareplus.kpatch");
    f(&mut b);
    let err = PatchFile::parse(&b).expect_err(what);
    let msg = err.to_string();
    eprintln!("{what}: {msg}");
    let got = err.field().unwrap_or_default();
    let ok = match field.split_once('*') {
        Some((pre, post)) => got.starts_with(pre) && got.ends_with(post),
        None => got == field,
    };
    assert!(ok, "{what}: expected field {field}: {msg}");
    assert!(msg.contains(" at 0x"), "{what}: no offset in {msg}");
    msg
}

#[test]
fn the_peers_files_have_a_sound_structure() {
    testkit::needs_interop!();
    for name in ["foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        PatchFile::parse(&interop(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn a_relocation_section_moved_onto_another_section_is_refused() {
    testkit::needs_interop!();
    // The eight variants the adversarial run found accepted, then crashing the target.
    for (what, info) in [
        ("sh_info=0", 0u32),
        ("sh_info=.text", TEXT),
        ("sh_info=.data", DATA),
        ("sh_info=.bss", BSS),
        ("sh_info=.symtab", SYMTAB as u32),
        ("sh_info=.shstrtab", SHSTRTAB),
        ("sh_info=.eh_frame", EH_FRAME),
        ("sh_info=.kpatch.info", KPATCH_INFO),
    ] {
        refused(
            what,
            |b| {
                let at = sh(b, RELA_KPATCH_TEXT, 44);
                b[at..at + 4].copy_from_slice(&info.to_le_bytes());
            },
            // A relocation past the end of its new target is refused first.
            "section[19]*",
        );
    }
}

#[test]
fn relocations_that_are_not_a_relocation_section_are_refused() {
    testkit::needs_interop!();
    let msg = refused(
        ".rela.kpatch.text sh_type=PROGBITS",
        |b| {
            let at = sh(b, RELA_KPATCH_TEXT, 4);
            b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
        },
        "section[19].sh_type",
    );
    assert!(msg.contains(".kpatch.text"), "{msg}");
}

#[test]
fn patch_code_without_bytes_is_refused() {
    testkit::needs_interop!();
    refused(
        ".kpatch.text sh_type=NOBITS",
        |b| {
            let at = sh(b, KPATCH_TEXT, 4);
            b[at..at + 4].copy_from_slice(&8u32.to_le_bytes());
        },
        "section[18].sh_type",
    );
}

#[test]
fn overlapping_sections_and_headers_are_refused() {
    testkit::needs_interop!();
    let targets = |b: &[u8]| {
        [
            ("the ELF header", 0u64),
            ("the section header table", u64_at(b, BASE + 40)),
            ("section 41", u64_at(b, sh(b, SYMTAB, 24))),
        ]
    };
    let original = interop("foo.libcareplus.kpatch");
    for (what, off) in targets(&original) {
        let msg = refused(
            &format!(".kpatch.text over {what}"),
            |b| {
                let at = sh(b, KPATCH_TEXT, 24);
                b[at..at + 8].copy_from_slice(&off.to_le_bytes());
            },
            "section[*].sh_offset",
        );
        assert!(msg.contains(what) && msg.contains("section 18"), "{msg}");
        assert!(msg.contains("rebuild the patch"), "{msg}");
    }
}

#[test]
fn symbols_moved_into_the_wrong_kind_of_section_are_refused() {
    testkit::needs_interop!();
    // report.kpatch (the new body) into .kpatch.data; stdout (data) into .kpatch.text.
    for (what, j, shndx) in [
        ("report.kpatch into .kpatch.data", 8usize, KPATCH_DATA),
        ("stdout into .kpatch.text", 4, KPATCH_TEXT as u16),
    ] {
        refused(
            what,
            |b| {
                let at = sym(b, j, 6);
                b[at..at + 2].copy_from_slice(&shndx.to_le_bytes());
            },
            &format!("section[41].sym[{j}].st_shndx"),
        );
    }
}

/// A 48-byte `struct kpatch_info` with the given daddr/dlen.
fn record(daddr: u64, dlen: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(48);
    r.extend_from_slice(&daddr.to_le_bytes());
    r.extend_from_slice(&(daddr + 0x1000).to_le_bytes());
    r.extend_from_slice(&dlen.to_le_bytes());
    r.extend_from_slice(&(dlen + 4).to_le_bytes());
    r.extend_from_slice(&[0u8; 24]);
    r
}

/// A patch whose `.kpatch.info` holds `records` (raw, unrelocated daddrs).
fn patch_with(records: &[(u64, u32)]) -> Vec<u8> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let text = obj.section_id(StandardSection::Text);
    obj.append_section_data(text, &[0xc3], 1);
    let info = obj.add_section(Vec::new(), b".kpatch.info".to_vec(), SectionKind::Data);
    let mut data = Vec::new();
    for (daddr, dlen) in records {
        data.extend(record(*daddr, *dlen));
    }
    data.extend_from_slice(&[0u8; 48]);
    obj.append_section_data(info, &data, 8);
    let elf = obj.write().unwrap();
    let bid = kpatch_file::BuildId::parse("7788a89bcdbac583d60693ece924593d0d07e6a9").unwrap();
    let opts = kpatch_file::MakeOptions {
        layout: kpatch_file::Layout::LibCarePlus,
        build_time: 0,
        checksum: false,
    };
    // make_with parses its output: build the container by hand to see the error.
    let mut out = kpatch_file::Header::new(opts.layout, bid, None)
        .unwrap()
        .to_bytes();
    let mut elf = elf;
    elf.resize(elf.len().div_ceil(16) * 16, 0);
    let total = (out.len() + elf.len()) as u32;
    out[160..164].copy_from_slice(&total.to_le_bytes());
    out.extend(elf);
    out
}

#[test]
fn a_function_replaced_twice_is_refused() {
    assert!(PatchFile::parse(&patch_with(&[(0x10, 0x20), (0x40, 0x30)])).is_ok());
    for (what, records) in [
        ("same function twice", [(0x10u64, 0x20u32), (0x10, 0x20)]),
        ("overlapping functions", [(0x10, 0x20), (0x2f, 0x10)]),
    ] {
        let err = PatchFile::parse(&patch_with(&records)).expect_err(what);
        let msg = err.to_string();
        eprintln!("{what}: {msg}");
        assert_eq!(err.field(), Some(".kpatch.info[1].daddr"), "{msg}");
        assert!(msg.contains("once"), "{msg}");
    }
}

#[test]
fn names_that_do_not_print_are_escaped_in_the_report() {
    testkit::needs_interop!();
    let mut b = interop("foo.libcareplus.kpatch");
    // Every "report.kpatch" (symbol name, .kpatch.strtab) becomes "report\x1b[2Jpatch".
    let needle = b"report.kpatch";
    let mut i = 0;
    while let Some(p) = b[i..].windows(needle.len()).position(|w| w == needle) {
        let at = i + p;
        b[at + 6..at + 9].copy_from_slice(b"\x1b[2");
        b[at + 9] = b'J';
        i = at + needle.len();
    }
    let file = PatchFile::parse(&b).unwrap();
    let text = Report::new(&file).to_string();
    assert!(!text.contains('\x1b'), "raw escape in the report:\n{text}");
    assert!(text.contains("report\\x1b[2Jtch"), "{text}");
    let view: &ElfView = file.elf_view();
    let names: Vec<String> = view
        .symtab()
        .unwrap()
        .symbols
        .iter()
        .map(|s| s.name_str().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "report\\x1b[2Jtch"), "{names:?}");
    // Compiler names are unchanged, other non-printing text is escaped too.
    assert_eq!(kpatch_file::printable(b"foo.cold"), "foo.cold");
    assert_eq!(
        kpatch_file::printable(b"a\xff\x7fb\xc2\x9bc\xe2\x80\xaed"),
        "a\\xff\\x7fb\\u{9b}c\\u{202e}d"
    );
}

#[test]
fn the_size_is_checked_against_the_header_before_reading() {
    testkit::needs_interop!();
    let b = interop("foo.libcareplus.kpatch");
    let len = b.len() as u64;
    assert_eq!(PatchFile::expected_len(&b[..688], len).unwrap(), len);
    let big = PatchFile::expected_len(&b[..688], 20 << 30).unwrap_err();
    assert_eq!(big.field(), Some("header.total_size"), "{big}");
    assert!(big.to_string().contains("trailing data"), "{big}");
    let short = PatchFile::expected_len(&b[..688], len - 1).unwrap_err();
    assert_eq!(short.kind(), "past-end", "{short}");
}
