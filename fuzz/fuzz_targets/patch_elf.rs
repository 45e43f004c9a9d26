//! Any bytes as the patch ELF given to `patch_elf::strip`, `rel_fixup` and `undo_link`
//! (with a fixed valid original executable), and as the original executable given to
//! `rel_fixup`/`undo_link` (with a fixed valid patch): every call returns `Ok` or `Err`,
//! never panics. The first input byte picks the role.
//!
//! ORIG (`seeds/orig-prog`) is scenario-exe's orig.c built `-O2` PIE; the fixed patches
//! are its patch from patched-basic.c as `--rel-fixup` and `--undo-link` take them (the
//! seed corpus holds every stage of that pipeline, prefixed by the role byte).

#![no_main]

use libfuzzer_sys::fuzz_target;

static ORIG: &[u8] = include_bytes!("../seeds/orig-prog");
/// After `--strip` and `strip --strip-unneeded`: the input of `--rel-fixup`.
static PATCH_UNNEEDED: &[u8] = include_bytes!("../seeds/patch-unneeded.elf");
/// After `--rel-fixup`: the input of `--undo-link`.
static PATCH_FIXED: &[u8] = include_bytes!("../seeds/patch-fixup.elf");

fuzz_target!(|data: &[u8]| {
    let Some((&role, rest)) = data.split_first() else {
        return;
    };
    if role & 1 == 0 {
        // `rest` is the patch at some stage of the pipeline.
        if let Ok(stripped) = patch_elf::strip(rest) {
            let _ = patch_elf::rel_fixup(ORIG, &stripped);
        }
        if let Ok(fixed) = patch_elf::rel_fixup(ORIG, rest) {
            let _ = patch_elf::undo_link(ORIG, &fixed);
        }
        let _ = patch_elf::undo_link(ORIG, rest);
    } else {
        // `rest` is the original executable.
        let _ = patch_elf::rel_fixup(rest, PATCH_UNNEEDED);
        let _ = patch_elf::undo_link(rest, PATCH_FIXED);
    }
});
