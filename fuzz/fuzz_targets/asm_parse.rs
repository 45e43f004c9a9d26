//! Any UTF-8 text as gcc assembly: `asm_diff::filter` and `asm_diff::gensrc` (the input
//! against itself, and the halves around the first NUL against each other) return
//! `Ok` or `Err`, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let opts = asm_diff::Options::default();
    let _ = asm_diff::filter(text, &opts);
    let _ = asm_diff::gensrc(text, text, &opts);
    if let Some((a, b)) = text.split_once('\0') {
        let _ = asm_diff::gensrc(a, b, &opts);
        let gp = asm_diff::Options {
            force_gotpcrel: true,
            force_global: true,
            ..asm_diff::Options::default()
        };
        let _ = asm_diff::gensrc(a, b, &gp);
    }
});
