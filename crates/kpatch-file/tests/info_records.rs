//! `.kpatch.info` of a patch linked from several objects: one zero-terminated array
//! per object, back to back. Every record must be listed, not only the first array's.

use kpatch_file::elf::ElfView;
use kpatch_file::inspect::kpatch_info_records;
use object::write::{Object, StandardSection};
use object::{Architecture, BinaryFormat, Endianness, SectionKind};

/// A 48-byte `struct kpatch_info` with the given dlen/slen and distinct addresses.
fn record(daddr: u64, dlen: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(48);
    r.extend_from_slice(&daddr.to_le_bytes());
    r.extend_from_slice(&(daddr + 0x1000).to_le_bytes());
    r.extend_from_slice(&dlen.to_le_bytes());
    r.extend_from_slice(&(dlen + 4).to_le_bytes());
    r.extend_from_slice(&[0u8; 24]);
    r
}

#[test]
fn records_after_a_terminator_are_listed_too() {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let text = obj.section_id(StandardSection::Text);
    obj.append_section_data(text, &[0xc3], 1);
    let info = obj.add_section(Vec::new(), b".kpatch.info".to_vec(), SectionKind::Data);
    let mut data = record(0x10, 0x20);
    data.extend_from_slice(&[0u8; 48]);
    data.extend(record(0x40, 0x30));
    data.extend_from_slice(&[0u8; 48]);
    obj.append_section_data(info, &data, 8);
    let elf = obj.write().unwrap();

    let view = ElfView::parse(&elf, 0).unwrap();
    let recs = kpatch_info_records(&view);
    let got: Vec<(u64, u32)> = recs.iter().map(|r| (r.daddr, r.dlen)).collect();
    assert_eq!(got, vec![(0x10, 0x20), (0x40, 0x30)]);
    assert_eq!(recs[1].offset, 96);
}
