//! Inputs the `patch_elf` fuzz target crashed on (tests/fixtures/fuzz-found/patch_elf/,
//! see its README): a malformed `.gnu.hash` that overflowed object's ELF writer, and a
//! section size that made it reserve about 2^56 bytes (SIGABRT). Each one is replayed
//! exactly as the fuzz target does and must come back as an `Err` that names what is
//! wrong, never a panic or an abort.

use std::path::PathBuf;

fn fixtures() -> PathBuf {
    testkit::fixture_dir("fuzz-found")
}

fn crash_inputs() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixtures().join("patch_elf"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), data)
        })
        .collect();
    out.sort();
    out
}

fn orig() -> Vec<u8> {
    std::fs::read(fixtures().join("patch_elf-orig-prog")).unwrap()
}

#[test]
fn fuzz_found_patch_files_are_rejected_with_an_error() {
    let orig = orig();
    let inputs = crash_inputs();
    assert!(inputs.len() >= 3, "fixtures missing: {inputs:?}");
    for (name, data) in &inputs {
        let (&role, patch) = data.split_first().unwrap();
        assert_eq!(role & 1, 0, "{name}: expected a patch-role input");
        // What each crash file broke, and the field the error must name.
        let field = if name.contains("gnu_hash") {
            "bloom_"
        } else {
            "sh_addralign"
        };
        // The fuzz target's sequence: strip (then rel-fixup of its output), rel-fixup
        // (then undo-link of its output), undo-link. All read the damaged file first.
        let errors = [
            patch_elf::strip(patch).map(|_| ()),
            patch_elf::rel_fixup(&orig, patch).map(|_| ()),
            patch_elf::undo_link(&orig, patch).map(|_| ()),
        ];
        for (stage, r) in ["strip", "rel-fixup", "undo-link"].iter().zip(errors) {
            let e = r.expect_err(&format!("{name}: {stage} accepted a damaged file"));
            let msg = e.to_string();
            eprintln!("{name}: {stage}: {msg}");
            assert!(msg.contains(field), "{name}: {stage}: {msg}");
        }
    }
}
