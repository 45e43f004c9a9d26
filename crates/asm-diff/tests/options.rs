//! `--dbg-filter`, `--force-global`, `--force-gotpcrel`, `--verbose` and the
//! refusals, on code built by the real gcc.

mod common;

use std::path::Path;

use asm_diff::{filter, gensrc, Error, Options};
use common::*;
use object::{Object, ObjectSection, ObjectSymbol};

fn fixture(case: &str) -> std::path::PathBuf {
    testkit::fixture_dir(case)
}

fn asm(dir: &Path, src: &str, flags: &'static [&'static str]) -> String {
    let v = Variant {
        name: "custom",
        flags,
        link: &[],
        fallback: "O2",
    };
    let tmp = testkit::Scratch::new().unwrap();
    let out = tmp.join("x.s");
    compile_s(&dir.join(src), &out, v.flags, &case_flags(dir));
    std::fs::read_to_string(out).unwrap()
}

/// gcc -S of a C snippet.
fn asm_c(code: &str, flags: &[&str]) -> String {
    let tmp = testkit::Scratch::new().unwrap();
    let c = tmp.write("x.c", code).unwrap();
    let out = tmp.join("x.s");
    compile_s(&c, &out, flags, &[]);
    std::fs::read_to_string(out).unwrap()
}

#[test]
fn dbg_filter_drops_line_info_but_assembles_to_the_same_code() {
    let dir = fixture("gensrc-line-only");
    let (o, p) = (
        asm(&dir, "orig.c", &["-O2", "-g"]),
        asm(&dir, "patched.c", &["-O2", "-g"]),
    );
    let (fo, fp) = (
        filter(&o, &Options::default()).unwrap(),
        filter(&p, &Options::default()).unwrap(),
    );
    assert!(o.contains("\t.loc ") && !fo.contains("\t.loc ") && !fo.contains(".debug_info"));
    assert!(fo.contains(".cfi_startproc"), "filter must keep CFI");

    let tmp = testkit::Scratch::new().unwrap();
    let (a, b) = (
        tmp.write("o.s", &o).unwrap(),
        tmp.write("f.s", &fo).unwrap(),
    );
    let (ao, bo) = (tmp.join("o.o"), tmp.join("f.o"));
    assemble(&a, &ao);
    assemble(&b, &bo);
    let (ad, bd) = (std::fs::read(&ao).unwrap(), std::fs::read(&bo).unwrap());
    let (af, bf) = (
        object::File::parse(&*ad).unwrap(),
        object::File::parse(&*bd).unwrap(),
    );
    let mut compared = 0;
    for s in bf.sections() {
        let name = s.name().unwrap();
        if name.is_empty()
            || name.starts_with(".debug")
            || name.contains("symtab")
            || name.contains("strtab")
        {
            continue;
        }
        if name.starts_with(".rela") {
            continue;
        }
        let t = af
            .section_by_name(name)
            .unwrap_or_else(|| panic!("filtered object has extra section {name}"));
        assert_eq!(
            s.data().unwrap(),
            t.data().unwrap(),
            "section {name} differs after --dbg-filter"
        );
        assert_eq!(
            relocs(&bf, &s),
            relocs(&af, &t),
            "relocations of {name} differ after --dbg-filter"
        );
        compared += 1;
    }
    assert!(compared >= 4, "compared only {compared} sections");
    for s in af.sections() {
        let name = s.name().unwrap();
        if !name.starts_with(".debug") && !name.starts_with(".rela.debug") {
            assert!(
                bf.section_by_name(name).is_some(),
                "--dbg-filter lost section {name}"
            );
        }
    }

    // After filtering, moved lines change nothing but the __LINE__ user.
    let d = gensrc(&fo, &fp, &Options::default()).unwrap();
    assert_eq!(d.changed, vec!["where".to_string()]);
    let d = gensrc(
        &fo,
        &fp,
        &Options {
            ignore_line_macros: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(
        d.changed.is_empty(),
        "--ignore-line-macros still patches {:?}",
        d.changed
    );
    assert!(
        d.warnings.iter().any(|w| w.contains("`where`")),
        "{:?}",
        d.warnings
    );
    assert_eq!(d.asm, fo, "nothing to patch must give the original back");
}

#[test]
fn force_global_exports_original_and_copy_without_changing_linked_code() {
    let dir = fixture("gensrc-clone");
    let (o, p) = (
        asm(&dir, "orig.c", &["-O2"]),
        asm(&dir, "patched.c", &["-O2"]),
    );
    let d = gensrc(
        &o,
        &p,
        &Options {
            force_global: true,
            ..Options::default()
        },
    )
    .unwrap();
    let f = "weigh.constprop.0.isra.0";
    assert_eq!(d.changed, vec![f.to_string()]);
    let tmp = testkit::Scratch::new().unwrap();
    let (os, as_) = (
        tmp.write("o.s", &o).unwrap(),
        tmp.write("a.s", &d.asm).unwrap(),
    );
    let (oo, ao, ob, ab) = (
        tmp.join("o.o"),
        tmp.join("a.o"),
        tmp.join("o"),
        tmp.join("a"),
    );
    assemble(&os, &oo);
    assemble(&as_, &ao);

    let data = std::fs::read(&ao).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    for name in [f.to_string(), format!("{f}.kpatch")] {
        let sym = obj
            .symbols()
            .find(|s| s.name() == Ok(name.as_str()))
            .unwrap_or_else(|| panic!("no symbol {name}"));
        assert!(sym.is_global(), "{name} is not global");
    }
    // The info record now names the symbols, not section offsets.
    let (_, _, rel) = kpatch_info(&ao).unwrap();
    assert_eq!(rel.iter().find(|r| r.0 == 0).unwrap().2, f);
    assert_eq!(
        rel.iter().find(|r| r.0 == 8).unwrap().2,
        format!("{f}.kpatch")
    );

    link(&oo, &ob, false, &[]);
    link(&ao, &ab, false, &[]);
    // Data moves (the patch adds data sections), but the code of every function
    // of the original stays at its address with the same bytes.
    for name in [f, "main"] {
        assert_eq!(
            function_bytes(&ob, name),
            function_bytes(&ab, name),
            "--force-global changed {name}"
        );
    }
    assert_original_symbols_kept(&ob, &ab);
}

#[test]
fn force_gotpcrel_routes_loads_of_outside_variables_through_the_got() {
    let dir = fixture("gensrc-cold-part");
    let (o, p) = (
        asm(&dir, "orig.c", &["-O2"]),
        asm(&dir, "patched.c", &["-O2"]),
    );
    assert!(
        p.contains("stderr(%rip)"),
        "fixture no longer loads stderr directly"
    );
    let d = gensrc(
        &o,
        &p,
        &Options {
            force_gotpcrel: true,
            ..Options::default()
        },
    )
    .unwrap();
    let patch = &d.asm[d.asm.find("livecare: patch").unwrap()..];
    assert!(patch.contains("stderr@GOTPCREL(%rip)"), "{patch}");
    assert!(!patch.contains("stderr(%rip)"), "{patch}");

    let tmp = testkit::Scratch::new().unwrap();
    let a = tmp.write("a.s", &d.asm).unwrap();
    let (ao, ab) = (tmp.join("a.o"), tmp.join("a"));
    assemble(&a, &ao);
    let data = std::fs::read(&ao).unwrap();
    let obj = object::File::parse(&*data).unwrap();
    let mut got = 0;
    for sec in obj
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".kpatch.text")))
    {
        for r in relocs(&obj, &sec).into_iter().filter(|r| r.2 == "stderr") {
            // R_X86_64_GOTPCREL / GOTPCRELX / REX_GOTPCRELX.
            assert!(
                matches!(r.1, 9 | 41 | 42),
                "reference to stderr with relocation type {}",
                r.1
            );
            got += 1;
        }
    }
    assert!(got >= 1, "no GOT reference to stderr in patch code");
    link(&ao, &ab, false, &[]);

    // A store cannot be rerouted without a free register: it is reported.
    let dir = fixture("gensrc-static-local");
    let (o, p) = (
        asm(&dir, "orig.c", &["-O2"]),
        asm(&dir, "patched.c", &["-O2"]),
    );
    let d = gensrc(
        &o,
        &p,
        &Options {
            force_gotpcrel: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(
        d.warnings.iter().any(|w| w.contains("`tick`")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn verbose_reports_unknown_directives_and_keeps_them() {
    let src = asm_c("int f(int x) { return x * 3 + 1; }\n", &["-O2"]);
    let odd = src.replacen("\t.text\n", "\t.text\n\t.my_custom_directive 1, 2\n", 1);
    let d = gensrc(
        &odd,
        &odd,
        &Options {
            verbose: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains(".my_custom_directive")),
        "{:?}",
        d.warnings
    );
    assert!(d.asm.contains("\t.my_custom_directive 1, 2\n"));
    assert_eq!(
        asm_diff::parse::parse(&odd)
            .render()
            .matches(".my_custom_directive")
            .count(),
        1
    );
}

fn refusal(orig: &str, patched: &str, flags: &[&str]) -> Error {
    let (o, p) = (asm_c(orig, flags), asm_c(patched, flags));
    match gensrc(&o, &p, &Options::default()) {
        Err(e) => e,
        Ok(d) => panic!(
            "expected a refusal, got changed={:?} added={:?}",
            d.changed, d.added
        ),
    }
}

#[test]
fn refuses_changed_or_new_tls_variables() {
    let base = "__thread int depth = 1;\nint get(void) { return depth * 7 + 100; }\n";
    let e = refusal(base, &base.replace("= 1", "= 2"), &["-O2"]);
    assert!(
        matches!(&e, Error::TlsChanged { name, .. } if name == "depth"),
        "{e}"
    );
    let e = refusal(
        base,
        &format!("{base}__thread int fresh;\nint get2(void) {{ return fresh; }}\n"),
        &["-O2"],
    );
    assert!(
        matches!(&e, Error::TlsChanged { name, .. } if name == "fresh"),
        "{e}"
    );
}

#[test]
fn refuses_changed_static_variable_initialiser() {
    let base = "static int limit = 5;\nint over(int x) { return x > limit ? x * 3 : limit; }\nvoid set(int v) { limit = v; }\n";
    let e = refusal(base, &base.replace("= 5", "= 6"), &["-O0"]);
    assert!(
        matches!(&e, Error::VariableChanged { name, what } if name == "limit" && *what == "initial value"),
        "{e}"
    );
    assert!(e.to_string().contains("limit"));
}

#[test]
fn refuses_changed_constructors() {
    let base =
        "#include <stdio.h>\nint ready;\nint main(void) { printf(\"%d\\n\", ready); return 0; }\n";
    let patched =
        format!("{base}__attribute__((constructor)) static void init(void) {{ ready = 1; }}\n");
    let e = refusal(base, &patched, &["-O2"]);
    assert!(
        matches!(&e, Error::InitArrayChanged { section } if section == ".init_array"),
        "{e}"
    );
}

#[test]
fn refuses_functions_shorter_than_a_jump() {
    let base = "#include <stdio.h>\nvoid hook(void) { }\n";
    let e = refusal(base, &base.replace("{ }", "{ puts(\"hook\"); }"), &["-O2"]);
    assert!(
        matches!(&e, Error::FunctionTooShort { name, .. } if name == "hook"),
        "{e}"
    );
    // The same function at -O0 has a frame and is long enough.
    let (o, p) = (
        asm_c(base, &["-O0"]),
        asm_c(&base.replace("{ }", "{ puts(\"hook\"); }"), &["-O0"]),
    );
    assert_eq!(
        gensrc(&o, &p, &Options::default()).unwrap().changed,
        vec!["hook".to_string()]
    );
}

/// Address and bytes of a function symbol in a linked file.
fn function_bytes(path: &Path, name: &str) -> (u64, Vec<u8>) {
    let d = std::fs::read(path).unwrap();
    let o = object::File::parse(&*d).unwrap();
    let s = o
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no {name}"));
    let sec = o.section_by_index(s.section_index().unwrap()).unwrap();
    let start = (s.address() - sec.address()) as usize;
    (
        s.address(),
        sec.data().unwrap()[start..start + s.size() as usize].to_vec(),
    )
}

#[test]
fn warns_when_an_inlined_change_reaches_main() {
    let base = "#include <stdio.h>\nstatic int twice(int x) { return 2 * x; }\nint main(int c, char **v) { (void)v; printf(\"%d\\n\", twice(c)); return 0; }\n";
    let (o, p) = (
        asm_c(base, &["-O2"]),
        asm_c(&base.replace("2 * x", "3 * x"), &["-O2"]),
    );
    let d = gensrc(&o, &p, &Options::default()).unwrap();
    assert_eq!(d.changed, vec!["main".to_string()]);
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("`main`") && w.contains("safely")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn force_global_in_a_shared_library_keeps_calls_to_static_functions_direct() {
    let base = "static __attribute__((noinline)) int helper(int x) { return x * 7 + 3; }\nint api(int x) { return helper(x) + helper(x + 1); }\n";
    let flags = ["-O2", "-fPIC"];
    let (o, p) = (
        asm_c(base, &flags),
        asm_c(&base.replace("x * 7", "x * 9"), &flags),
    );
    let d = gensrc(
        &o,
        &p,
        &Options {
            force_global: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(d.changed, vec!["helper".to_string()]);
    let tmp = testkit::Scratch::new().unwrap();
    let (os, xs) = (
        tmp.write("o.s", &o).unwrap(),
        tmp.write("x.s", &d.asm).unwrap(),
    );
    let (oo, xo, olib, xlib) = (
        tmp.join("o.o"),
        tmp.join("x.o"),
        tmp.join("o.so"),
        tmp.join("x.so"),
    );
    assemble(&os, &oo);
    assemble(&xs, &xo);
    link(&oo, &olib, true, &[]);
    link(&xo, &xlib, true, &[]);
    for f in ["api", "helper"] {
        assert_eq!(
            function_bytes(&olib, f),
            function_bytes(&xlib, f),
            "{f} changed"
        );
    }
    let (_, _, rel) = kpatch_info(&xo).unwrap();
    assert_eq!(rel.iter().find(|r| r.0 == 0).unwrap().2, "helper");
}

#[test]
fn dbg_filter_keeps_local_binding_of_static_commons() {
    // `.local` starts with `.loc`; dropping it would turn `static int calls;` into a
    // global common symbol and change the object's symbol binding.
    let s = asm_c(
        "static int calls;\nint f(void){return ++calls;}\n",
        &["-O2", "-g"],
    );
    assert!(
        s.contains("\t.local\tcalls"),
        "fixture lost its .local:\n{s}"
    );
    let out = filter(&s, &Options::default()).unwrap();
    assert!(
        out.contains("\t.local\tcalls"),
        "filter dropped .local:\n{out}"
    );
    assert!(!out.contains("\t.loc\t"), "filter kept .loc lines");
}

/// Issue 17.2: gcov data (`--coverage`) changes with every edit of a file. It never
/// stops the diff: the records stay the original's, gcov's constructor is unchanged,
/// a changed function whose counter array keeps its shape counts in the original
/// array, and one whose array grew counts in new data of its own (never past the end
/// of the original array).
#[test]
fn coverage_records_never_stop_a_diff_and_grown_counters_are_new_data() {
    let src = |grow: &str, konst: &str| {
        format!(
            "long grow(long n) {{ {grow} }}\nlong konst(long n) {{ return n * {konst}; }}\n\
             long same(long n) {{ return n + 7; }}\n"
        )
    };
    let flags = ["-O2", "-g", "--coverage"];
    let o = asm_c(&src("return n * 2 + 1;", "2"), &flags);
    let p = asm_c(&src("if (n < 0) return 0; return -(n * 3);", "5"), &flags);
    let d = gensrc(&o, &p, &Options::default()).unwrap();
    let mut changed = d.changed.clone();
    changed.sort();
    assert_eq!(changed, ["grow", "konst"], "{:?}", d.warnings);
    assert!(d.added.is_empty(), "{:?}", d.added);
    let def = |name: &str| d.asm.lines().any(|l| l == format!("{name}:"));
    assert!(def("__gcov0.grow.kpatch"), "grown counters are new data");
    assert!(!def("__gcov0.konst.kpatch") && !def("__gcov0.same.kpatch"));
    assert!(!d.asm.contains(".LPBX0.kpatch") && !d.asm.contains("__gcov_.grow.kpatch"));
    let copy = |f: &str| {
        let at = d.asm.find(&format!("\n{f}.kpatch:")).unwrap();
        let end = d.asm[at..].find(".cfi_endproc").unwrap();
        d.asm[at..at + end].to_string()
    };
    assert!(copy("grow").contains("__gcov0.grow.kpatch(%rip)"));
    assert!(!copy("grow").contains("__gcov0.grow(%rip)"));
    assert!(copy("konst").contains("__gcov0.konst(%rip)"));
    let tmp = testkit::Scratch::new().unwrap();
    let s = tmp.write("out.s", &d.asm).unwrap();
    assemble(&s, &tmp.join("out.o"));
}
