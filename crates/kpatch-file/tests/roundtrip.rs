//! Write → read → equal, for headers with arbitrary field values and for whole
//! containers made from a real patch ELF.

use kpatch_file::{make_at, BuildId, Header, Layout, PatchFile, PatchId};
use proptest::prelude::*;

fn build_id() -> impl Strategy<Value = BuildId> {
    (4usize..=20)
        .prop_flat_map(|n| prop::collection::vec(any::<u8>(), n))
        .prop_map(|b| BuildId::from_bytes(&b))
}

fn patch_id() -> impl Strategy<Value = PatchId> {
    "[!-~]{1,7}".prop_map(|s| PatchId::parse(&s).unwrap())
}

fn text(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 0..max)
}

fn header() -> impl Strategy<Value = Header> {
    let ids = prop_oneof![
        (Just(Layout::LibCare), Just(None)),
        (Just(Layout::LibCarePlus), prop::option::of(patch_id())),
    ];
    let numbers = (
        any::<(u8, u8, u64, u32, u32)>(),
        any::<(u32, u32, u32, u32, u32, u64)>(),
        any::<[u32; 16]>(),
    );
    (ids, build_id(), text(64), text(25), numbers).prop_map(
        |((layout, id), bid, modulename, srcversion, numbers)| {
            let mut h = Header::new(layout, bid, id).unwrap();
            h.set_modulename(&modulename).unwrap();
            h.set_srcversion(&srcversion).unwrap();
            let ((flags, safety, time, csum, nr), (k, rel, total, jmp, elf, mem), entries) =
                numbers;
            h.flags = flags;
            h.safety_method = safety;
            h.build_time = time;
            h.csum = csum;
            h.nr_reloc = nr;
            h.kpatch_offset = k;
            h.rel_offset = rel;
            h.total_size = total;
            h.jmp_offset = jmp;
            if layout == Layout::LibCarePlus {
                h.elf_offset = elf;
                h.kpatch_total_mem_sz = mem;
            }
            h.entries = entries;
            h
        },
    )
}

fn interop_elf() -> Vec<u8> {
    let dir = testkit::interop_dir().expect("../shared/interop is missing");
    let scratch = testkit::Scratch::new().unwrap();
    let copy = scratch.join("p.kpatch");
    std::fs::copy(dir.join("foo.libcareplus.kpatch"), &copy).unwrap();
    let bytes = std::fs::read(copy).unwrap();
    PatchFile::parse(&bytes).unwrap().elf().to_vec()
}

thread_local! {
    static ELF: Vec<u8> = interop_elf();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn header_written_then_read_is_equal(h in header()) {
        let bytes = h.to_bytes();
        prop_assert_eq!(bytes.len(), h.layout().header_size());
        let back = Header::parse(&bytes).unwrap();
        prop_assert_eq!(back, h);
    }

    #[test]
    fn container_made_then_parsed_keeps_ids_and_elf(
        plus in any::<bool>(),
        bid in build_id(),
        id in patch_id(),
        time in any::<u64>(),
        cut in 0usize..16,
    ) {
        testkit::needs_interop!();
        let layout = if plus { Layout::LibCarePlus } else { Layout::LibCare };
        let id = plus.then_some(id);
        ELF.with(|elf| {
            // Cutting trailing padding changes the ELF length modulo 16.
            let elf = &elf[..elf.len() - cut.min(8)];
            let made = make_at(elf, &bid, id.as_ref(), layout, time).unwrap();
            let file = PatchFile::parse(&made).unwrap();
            assert_eq!(file.layout(), layout);
            assert_eq!(file.header().build_id(), &bid);
            assert_eq!(file.header().patch_id(), id.as_ref());
            assert_eq!(file.header().build_time, time);
            assert_eq!(&file.elf()[..elf.len()], elf);
            assert_eq!(file.elf().len() % 16, 0);
        });
    }
}

#[test]
fn a_long_hex_module_name_does_not_make_libcareplus_look_like_libcare() {
    let bid = BuildId::parse("0123456789abcdef").unwrap();
    let mut h = Header::new(Layout::LibCarePlus, bid, None).unwrap();
    // Runs from offset 24 up to 86, so offset 80 holds hex digits.
    h.set_modulename(&[b'a'; 63]).unwrap();
    h.kpatch_offset = 0;
    assert_eq!(Header::detect(&h.to_bytes()).unwrap(), Layout::LibCarePlus);
    assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
}

#[test]
fn a_short_libcare_build_id_is_still_libcare() {
    let bid = BuildId::parse("deadbeef").unwrap();
    let h = Header::new(Layout::LibCare, bid, None).unwrap();
    assert_eq!(Header::detect(&h.to_bytes()).unwrap(), Layout::LibCare);
}
