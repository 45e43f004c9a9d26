//! The fixture corpus: every `tests/fixtures/gensrc-*` case built at -O0, -O2 and
//! -O2 -g, diffed, assembled and linked; the original code must survive intact and
//! `.kpatch.info` must list exactly the expected functions.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use asm_diff::{gensrc, Options};
use common::*;

/// What a case expects for one variant.
#[derive(Debug, Default)]
struct Expect {
    changed: BTreeSet<String>,
    added: BTreeSet<String>,
    refuse: Option<String>,
    warn: Option<String>,
}

fn expectation(dir: &Path, variant: &Variant) -> Expect {
    expectation_for(dir, variant.name).unwrap_or_else(|| {
        expectation_for(dir, variant.fallback)
            .unwrap_or_else(|| panic!("{}: no expectation for {}", dir.display(), variant.name))
    })
}

fn expectation_for(dir: &Path, variant: &str) -> Option<Expect> {
    let text = std::fs::read_to_string(dir.join("expect")).unwrap();
    let mut e = Expect::default();
    let mut found = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "refuse" => {
                e.refuse = Some(v.trim().to_string());
                found = true;
            }
            "warn" => e.warn = Some(v.trim().to_string()),
            k if k == variant => {
                let (c, a) = v.split_once(';').unwrap_or((v, ""));
                e.changed = c.split_whitespace().map(str::to_string).collect();
                e.added = a.split_whitespace().map(str::to_string).collect();
                found = true;
            }
            _ => {}
        }
    }
    found.then_some(e)
}

fn run_case(dir: &Path, variant: &Variant) {
    let case = dir.file_name().unwrap().to_string_lossy().to_string();
    let tmp = testkit::Scratch::new().unwrap();
    let shared = case_shared(dir);
    let (o, p) = (
        asm_of(dir, "orig.c", variant),
        asm_of(dir, "patched.c", variant),
    );
    let os = tmp.write("orig.s", &o).unwrap();
    let exp = expectation(dir, variant);
    let ctx = format!("{case} [{}]", variant.name);

    let result = gensrc(&o, &p, &Options::default());
    if let Some(name) = &exp.refuse {
        let err = result.expect_err(&format!("{ctx}: expected a refusal naming {name}"));
        assert!(
            err.to_string().contains(name),
            "{ctx}: refusal `{err}` does not name {name}"
        );
        return;
    }
    let diff = result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let changed: BTreeSet<String> = diff.changed.iter().cloned().collect();
    let added: BTreeSet<String> = diff.added.iter().cloned().collect();
    assert_eq!(changed, exp.changed, "{ctx}: changed functions");
    assert_eq!(added, exp.added, "{ctx}: added functions");
    if let Some(w) = &exp.warn {
        assert!(
            diff.warnings.iter().any(|x| x.contains(w.as_str())),
            "{ctx}: no warning naming {w}: {:?}",
            diff.warnings
        );
    }

    let out = tmp.write("out.s", &diff.asm).unwrap();
    let (oo, ao) = (tmp.join("orig.o"), tmp.join("out.o"));
    assemble(&os, &oo);
    assemble(&out, &ao);
    let new_sections = assert_same_except_kpatch(&oo, &ao);

    if exp.changed.is_empty() && exp.added.is_empty() {
        assert!(
            new_sections.is_empty(),
            "{ctx}: identical inputs emitted {new_sections:?}"
        );
        assert_eq!(
            diff.asm, o,
            "{ctx}: identical inputs must give the original back"
        );
    } else {
        assert!(
            new_sections.iter().any(|s| s == ".kpatch.text"),
            "{ctx}: no .kpatch.text in {new_sections:?}"
        );
        // The copies carry CFI: the applier unwinds through patch code.
        let eh = {
            use object::Object;
            let data = std::fs::read(&ao).unwrap();
            let f = object::File::parse(&*data).unwrap();
            let sec = f.section_by_name(".eh_frame").expect("no .eh_frame");
            relocs(&f, &sec)
        };
        assert!(
            eh.iter().any(|r| r.2 == "[.kpatch.text]"),
            "{ctx}: no FDE for .kpatch.text"
        );
        let (info, names, rel) =
            kpatch_info(&ao).unwrap_or_else(|| panic!("{ctx}: no .kpatch.info"));
        let names: BTreeSet<String> = names.into_iter().collect();
        assert_eq!(names, exp.changed, "{ctx}: .kpatch.strtab names");
        assert_eq!(
            info.len(),
            48 * (exp.changed.len() + 1),
            "{ctx}: .kpatch.info records + terminator"
        );
        assert!(
            info[info.len() - 48..].iter().all(|&b| b == 0),
            "{ctx}: last record is not all-zero"
        );
        // Each record: daddr, saddr and symstr are relocated; dlen/slen are resolved.
        for k in 0..exp.changed.len() as u64 {
            let at = |off: u64| rel.iter().filter(|r| r.0 == 48 * k + off).count();
            assert_eq!(
                (at(0), at(8), at(16), at(24)),
                (1, 1, 0, 1),
                "{ctx}: relocations of record {k}"
            );
            let dlen = u32::from_le_bytes(info[48 * k as usize + 16..][..4].try_into().unwrap());
            let slen = u32::from_le_bytes(info[48 * k as usize + 20..][..4].try_into().unwrap());
            assert!(
                dlen >= 5 && slen >= 5,
                "{ctx}: record {k} sizes {dlen}/{slen}"
            );
        }
    }

    let (ob, ab) = (tmp.join("orig.bin"), tmp.join("out.bin"));
    link(&oo, &ob, shared, variant.link);
    link(&ao, &ab, shared, variant.link);
    assert_original_symbols_kept(&ob, &ab);

    if !shared && !exp.changed.is_empty() {
        // Apply the patch on disk the way the applier does in memory (a jump
        // from each original function to its copy) and check the program now
        // behaves like the patched build.
        let (ps, po, pb) = (
            tmp.write("patched.s", &p).unwrap(),
            tmp.join("patched.o"),
            tmp.join("patched.bin"),
        );
        assemble(&ps, &po);
        link(&po, &pb, false, variant.link);
        let jumped = tmp.join("jumped.bin");
        write_jumps(&ab, &jumped, &diff.changed);
        let (want, got, before) = (run_bin(&pb), run_bin(&jumped), run_bin(&ob));
        assert_eq!(
            got, want,
            "{ctx}: patched-in-place binary does not behave like the patched build"
        );
        assert_ne!(before, want, "{ctx}: fixture change is not observable");
    }
}

/// Runs a fixture program; its stdout, stderr and exit status.
fn run_bin(path: &Path) -> (String, String, Option<i32>) {
    let out = std::process::Command::new(path).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

/// Copies `bin` to `out` with `jmp <fn>.kpatch` written at the entry of each
/// function in `funcs`.
fn write_jumps(bin: &Path, out: &Path, funcs: &[String]) {
    use object::{Object, ObjectSection, ObjectSymbol};
    let mut data = std::fs::read(bin).unwrap();
    let mut writes = Vec::new();
    {
        let f = object::File::parse(&*data).unwrap();
        let sym = |n: &str| {
            f.symbols()
                .find(|s| s.name() == Ok(n))
                .unwrap_or_else(|| panic!("{}: no symbol {n}", bin.display()))
        };
        for name in funcs {
            let (from, to) = (sym(name), sym(&format!("{name}.kpatch")));
            let sec = f.section_by_index(from.section_index().unwrap()).unwrap();
            let (file_off, _) = sec.file_range().unwrap();
            let at = (file_off + from.address() - sec.address()) as usize;
            let rel = to.address() as i64 - (from.address() as i64 + 5);
            let mut jmp = vec![0xe9];
            jmp.extend_from_slice(&i32::try_from(rel).unwrap().to_le_bytes());
            writes.push((at, jmp));
        }
    }
    for (at, bytes) in writes {
        data[at..at + 5].copy_from_slice(&bytes);
    }
    std::fs::write(out, &data).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn every_fixture_keeps_original_code_and_lists_exactly_the_changed_functions() {
    run_corpus(VARIANTS);
}

#[test]
fn corpus_also_holds_at_os_function_sections_cet_and_no_pic() {
    run_corpus(MORE_VARIANTS);
}

fn run_corpus(variants: &'static [Variant]) {
    let cases = cases();
    assert!(cases.len() >= 14, "fixture corpus incomplete: {cases:?}");
    // Cases are independent; run them on all cores to keep the suite fast.
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|dir| {
                s.spawn(move || {
                    for v in variants {
                        run_case(dir, v);
                    }
                })
            })
            .collect();
        let mut failures = Vec::new();
        for (h, dir) in handles.into_iter().zip(&cases) {
            if let Err(e) = h.join() {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {msg}", dir.display()));
            }
        }
        assert!(
            failures.is_empty(),
            "failing cases:\n{}",
            failures.join("\n")
        );
    });
}

#[test]
fn parse_and_render_reassembles_every_corpus_file_identically() {
    let tmp = testkit::Scratch::new().unwrap();
    let mut n = 0;
    for dir in cases() {
        for v in VARIANTS.iter().chain(MORE_VARIANTS) {
            // The patched files differ only where the diff already reads them.
            let src = "orig.c";
            let text = asm_of(&dir, src, v);
            let s = tmp.write(&format!("{n}.s"), &text).unwrap();
            let rendered = asm_diff::parse::parse(&text).render();
            let r = tmp.write(&format!("{n}.r.s"), rendered).unwrap();
            let (a, b) = (tmp.join(format!("{n}.o")), tmp.join(format!("{n}.r.o")));
            assemble(&s, &a);
            assemble(&r, &b);
            assert_eq!(
                std::fs::read(&a).unwrap(),
                std::fs::read(&b).unwrap(),
                "{} {} [{}]: re-rendered assembly differs",
                dir.display(),
                src,
                v.name
            );
            n += 1;
        }
    }
}
