//! UTF-8 in assembly: gcc emits C identifiers such as `café` in raw UTF-8, `.file`
//! names and inline-asm comments carry whatever the source had, and hand-written
//! `.string "…"` may hold UTF-8. The tokenizer once sliced inside such characters and
//! panicked (fuzz/crashes/asm_parse, copied to tests/fixtures/fuzz-found/asm_parse/).

mod common;

use asm_diff::{filter, gensrc, Options};
use common::*;
use object::{Object, ObjectSymbol};

const ORIG: &str = r##"#include <stdio.h>
int café = 1;
static const char *msg = "grüße, 世界";
__attribute__((noinline)) int ÿ_func(int x) { __asm__ volatile("# ünïcode ×comment\n\tnop"); return x + café; }
int main(void) { puts(msg); return ÿ_func(2); }
"##;

/// gcc -S -O2 -g of `code` saved as a file whose name is UTF-8 too.
fn asm_of(code: &str) -> String {
    let tmp = testkit::Scratch::new().unwrap();
    let c = tmp.write("héllo_wörld.c", code).unwrap();
    let out = tmp.join("x.s");
    compile_s(&c, &out, &["-O2", "-g"], &[]);
    std::fs::read_to_string(out).unwrap()
}

#[test]
fn utf8_identifiers_and_strings_are_diffed_and_renamed_whole() {
    let a = asm_of(ORIG);
    assert!(a.contains("ÿ_func:"), "gcc no longer emits raw UTF-8 names");
    let b = asm_of(&ORIG.replace("x + café", "x * 3 + café"));
    let d = gensrc(&a, &b, &Options::default()).expect("gensrc");
    assert_eq!(d.changed, vec!["ÿ_func".to_string()]);
    assert!(d.asm.contains("ÿ_func.kpatch:"), "copy not named whole");
    // A hand-written UTF-8 `.string` in the patched copy's data survives byte for byte.
    let asm = format!(
        "{}\n\t.section .kpatch.data,\"aw\",@progbits\n\t.string \"ünï ×\"\n",
        d.asm
    );

    let tmp = testkit::Scratch::new().unwrap();
    let s = tmp.write("out.s", &asm).unwrap();
    let o = tmp.join("out.o");
    assemble(&s, &o);
    let bytes = std::fs::read(&o).unwrap();
    let obj = object::File::parse(&*bytes).unwrap();
    let names: Vec<String> = obj
        .symbols()
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();
    for want in ["ÿ_func", "ÿ_func.kpatch", "café"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing in {names:?}"
        );
    }
    assert!(bytes
        .windows("ünï ×".len())
        .any(|w| w == "ünï ×".as_bytes()));
    // The patch copy reads the original variable, not a mangled half of its name.
    let kp = d.asm.split("ÿ_func.kpatch:").nth(1).unwrap();
    assert!(
        kp.contains("café(%rip)") || kp.contains("café@GOTPCREL(%rip)"),
        "{kp}"
    );
}

#[test]
fn multibyte_characters_next_to_operands_do_not_panic() {
    let opts = Options::default();
    for body in [
        "\tmovl\t%eax, \u{55a}si\n",
        "\tmovq\t$\u{6d5}12, %rdi\n",
        "\tleaq\tx\u{20ac}(%rip), %rax # \u{e9}t\u{e9}\n\t.string \"\u{e9}\\\u{e9}\"\n",
        "\tmovl\t$1, %eax \u{d7} 2\n\tcall\t\u{e9}@PLT\n",
    ] {
        let text = format!(
            "\t.text\n\t.globl\tf\n\t.type\tf, @function\nf:\n\tmovq\t$0, %rax\n\tmovq\t$0, %rdx\n{body}\tret\n\t.size\tf, .-f\n"
        );
        let patched = text.replace("ret", "nop\n\tret");
        let _ = filter(&text, &opts);
        let _ = gensrc(&text, &text, &opts);
        let d = gensrc(&text, &patched, &opts).expect("gensrc");
        assert_eq!(d.changed, vec!["f".to_string()], "{text}");
    }
}

#[test]
fn fuzz_found_asm_inputs_do_not_panic() {
    let dir = testkit::fixture_dir("fuzz-found").join("asm_parse");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let text = String::from_utf8(std::fs::read(&p).unwrap()).unwrap();
        // The fuzz target's calls.
        let opts = Options::default();
        let _ = filter(&text, &opts);
        let _ = gensrc(&text, &text, &opts);
        if let Some((a, b)) = text.split_once('\0') {
            let _ = gensrc(a, b, &opts);
            let gp = Options {
                force_gotpcrel: true,
                force_global: true,
                ..Options::default()
            };
            let _ = gensrc(a, b, &gp);
        }
        n += 1;
    }
    assert!(n >= 2, "fixtures missing");
}
