//! The container against the files LibCare and LibcarePlus made themselves.

use kpatch_file::inspect::Report;
use kpatch_file::{make_at, make_with, BuildId, Header, Layout, MakeOptions, PatchFile, PatchId};

const BUILD_ID: &str = "7788a89bcdbac583d60693ece924593d0d07e6a9";

/// Copies an interop vector into a scratch dir and reads it (the originals stay untouched).
fn interop(name: &str) -> Vec<u8> {
    let dir = testkit::interop_dir().expect("../shared/interop is missing");
    let scratch = testkit::Scratch::new().unwrap();
    let copy = scratch.join(name);
    std::fs::copy(dir.join(name), &copy).unwrap();
    std::fs::read(copy).unwrap()
}

#[test]
fn header_sizes_are_688_and_504() {
    assert_eq!(Layout::LibCare.header_size(), 688);
    assert_eq!(Layout::LibCarePlus.header_size(), 504);
}

#[test]
fn libcare_file_is_detected_and_parses_completely() {
    testkit::needs_interop!();
    let bytes = interop("foo.libcare.kpatch");
    let file = PatchFile::parse(&bytes).unwrap();
    assert_eq!(file.layout(), Layout::LibCare);
    assert_eq!(file.header().build_id().as_str(), BUILD_ID);
    assert_eq!(file.header().patch_id(), None);
    assert_eq!(file.header().kpatch_offset, 688);
    assert_eq!(file.header().total_size as usize, bytes.len());
    assert_eq!(file.elf().get(..4), Some(&b"\x7fELF"[..]));
    assert_eq!(file.elf_view().sections().len(), 44);
}

#[test]
fn libcareplus_file_is_detected_and_parses_completely() {
    testkit::needs_interop!();
    let bytes = interop("foo.libcareplus.kpatch");
    let file = PatchFile::parse(&bytes).unwrap();
    assert_eq!(file.layout(), Layout::LibCarePlus);
    assert_eq!(file.header().build_id().as_str(), BUILD_ID);
    assert_eq!(file.header().patch_id().map(PatchId::as_str), Some("0001"));
    assert_eq!(file.header().kpatch_offset, 504);
    assert_eq!(file.elf_view().sections().len(), 44);
}

#[test]
fn report_resolves_the_kpatch_info_record_of_report() {
    testkit::needs_interop!();
    for name in ["foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        let bytes = interop(name);
        let file = PatchFile::parse(&bytes).unwrap();
        let report = Report::new(&file);
        assert_eq!(report.elf.kpatch_info.len(), 1, "{name}");
        let rec = &report.elf.kpatch_info[0];
        assert_eq!(rec.daddr_symbol.as_deref(), Some("report"), "{name}");
        assert_eq!(rec.saddr_symbol.as_deref(), Some("report.kpatch"), "{name}");
        assert_eq!(rec.name.as_deref(), Some("report.kpatch"), "{name}");
        assert_eq!((rec.dlen, rec.slen), (0x36, 0x4a), "{name}");
        let text = report.to_string();
        assert!(text.contains(BUILD_ID), "{text}");
        assert!(text.contains("R_X86_64_REX_GOTPCRELX"), "{text}");
        assert!(text.contains("R_X86_64_PC32"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        let relocs = &json["elf"]["relocations"];
        let text_relocs = relocs
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["section"] == ".rela.kpatch.text")
            .unwrap();
        let symbols: Vec<&str> = text_relocs["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["symbol"].as_str().unwrap())
            .collect();
        assert!(symbols.contains(&"printf@GLIBC_2.2.5"), "{symbols:?}");
        assert!(symbols.contains(&".kpatch.data"), "{symbols:?}");
    }
}

#[test]
fn headers_reserialize_to_the_original_bytes() {
    testkit::needs_interop!();
    for name in ["foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        let bytes = interop(name);
        let header = Header::parse(&bytes).unwrap();
        assert_eq!(header.to_bytes(), bytes[..header.size()], "{name}");
    }
}

#[test]
fn make_rebuilds_both_peer_files_byte_for_byte() {
    testkit::needs_interop!();
    let cases = [
        ("foo.libcare.kpatch", Layout::LibCare, None),
        ("foo.libcareplus.kpatch", Layout::LibCarePlus, Some("0001")),
    ];
    for (name, layout, id) in cases {
        let bytes = interop(name);
        let file = PatchFile::parse(&bytes).unwrap();
        let id = id.map(|i| PatchId::parse(i).unwrap());
        let bid = BuildId::parse(BUILD_ID).unwrap();
        let build_time = file.header().build_time;
        let options = MakeOptions {
            layout,
            build_time,
            checksum: false,
        };
        let made = make_with(file.elf(), &bid, id.as_ref(), &options).unwrap();
        assert_eq!(made, bytes, "{name}");
    }
}

#[test]
fn make_pads_the_elf_to_16_bytes() {
    testkit::needs_interop!();
    let bytes = interop("foo.libcareplus.kpatch");
    let file = PatchFile::parse(&bytes).unwrap();
    // The ELF proper ends at its section header table; cut the container padding off.
    let view = file.elf_view();
    let end = view.sections().len() * 64 + section_table_offset(file.elf());
    let elf = &file.elf()[..end];
    assert_ne!(elf.len() % 16, 0, "test needs an unpadded ELF");
    let bid = BuildId::parse(BUILD_ID).unwrap();
    let id = PatchId::parse("0002").unwrap();
    let made = make_at(elf, &bid, Some(&id), Layout::LibCarePlus, 0).unwrap();
    // The ELF length is padded, not the file (504 is not a multiple of 16).
    assert_eq!((made.len() - 504) % 16, 0);
    assert_eq!(&made[504..504 + elf.len()], elf);
    assert!(made[504 + elf.len()..].iter().all(|&b| b == 0));
    let back = PatchFile::parse(&made).unwrap();
    assert_eq!(back.header().patch_id().map(PatchId::as_str), Some("0002"));
    assert_eq!(back.header().total_size as usize, made.len());
}

#[test]
fn make_refuses_a_patch_id_in_the_libcare_layout() {
    testkit::needs_interop!();
    let bytes = interop("foo.libcare.kpatch");
    let file = PatchFile::parse(&bytes).unwrap();
    let bid = BuildId::parse(BUILD_ID).unwrap();
    let id = PatchId::parse("0002").unwrap();
    let err = make_at(file.elf(), &bid, Some(&id), Layout::LibCare, 0).unwrap_err();
    assert_eq!(err.kind(), "unwritable");
    assert!(err.to_string().contains("LibcarePlus"), "{err}");
}

#[test]
fn make_refuses_a_non_elf_input() {
    let bid = BuildId::parse(BUILD_ID).unwrap();
    let err = make_at(&[0u8; 200], &bid, None, Layout::LibCarePlus, 0).unwrap_err();
    assert_eq!(err.field(), Some("elf.e_ident[EI_MAG]"), "{err}");
}

fn section_table_offset(elf: &[u8]) -> usize {
    u64::from_le_bytes(elf[40..48].try_into().unwrap()) as usize
}

#[test]
fn an_aarch64_patch_is_accepted_and_named() {
    testkit::needs_interop!();
    let mut bytes = interop("foo.libcareplus.kpatch");
    // e_machine = EM_AARCH64 (183).
    bytes[504 + 18..504 + 20].copy_from_slice(&183u16.to_le_bytes());
    let file = PatchFile::parse(&bytes).unwrap();
    assert_eq!(file.elf_view().machine(), kpatch_file::Machine::Aarch64);
    let report = Report::new(&file);
    assert_eq!(report.elf.machine, "aarch64");
    // x86_64 type 2 is not an aarch64 type: shown by number, not misnamed.
    let rel = report
        .elf
        .relocations
        .iter()
        .find(|r| r.section == ".rela.kpatch.text")
        .unwrap();
    assert_eq!(rel.entries[0].type_name, "R_AARCH64_2");
}

#[test]
fn the_checksum_catches_a_flipped_code_bit_the_peers_format_cannot() {
    testkit::needs_interop!();
    let bytes = interop("foo.libcareplus.kpatch");
    let file = PatchFile::parse(&bytes).unwrap();
    let text = file.elf_view().section_by_name(".kpatch.text").unwrap();
    let code_byte = 504 + text.offset as usize + 4;
    let bid = BuildId::parse(BUILD_ID).unwrap();

    // The peers leave csum 0: a flipped instruction bit is indistinguishable from a patch.
    let mut flipped = bytes.clone();
    flipped[code_byte] ^= 0x10;
    assert!(PatchFile::parse(&flipped).is_ok());

    // livecare's own output carries a CRC-32 of the ELF, so the same flip is refused.
    let made = make_at(file.elf(), &bid, None, Layout::LibCarePlus, 0).unwrap();
    let csum = PatchFile::parse(&made).unwrap().header().csum;
    assert_eq!(csum, kpatch_file::crc32(file.elf()));
    let mut flipped = made.clone();
    flipped[code_byte] ^= 0x10;
    let err = PatchFile::parse(&flipped).unwrap_err();
    assert_eq!(err.field(), Some("header.csum"), "{err}");
    assert!(err.to_string().contains("corrupted"), "{err}");
}

#[test]
fn extended_section_count_and_string_index_are_followed() {
    testkit::needs_interop!();
    let mut bytes = interop("foo.libcareplus.kpatch");
    let shoff = 504 + u64::from_le_bytes(bytes[504 + 40..504 + 48].try_into().unwrap()) as usize;
    // e_shnum 0 and e_shstrndx SHN_XINDEX: the real values live in section 0.
    bytes[504 + 60..504 + 62].copy_from_slice(&0u16.to_le_bytes());
    bytes[504 + 62..504 + 64].copy_from_slice(&0xffffu16.to_le_bytes());
    bytes[shoff + 32..shoff + 40].copy_from_slice(&44u64.to_le_bytes());
    bytes[shoff + 40..shoff + 44].copy_from_slice(&43u32.to_le_bytes());
    let file = PatchFile::parse(&bytes).unwrap();
    assert_eq!(file.elf_view().sections().len(), 44);
    assert!(file.elf_view().section_by_name(".kpatch.info").is_some());
}
