//! Shared helpers: compile fixtures with gcc, compare objects with `object`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionKind};
use testkit::run_ok;

/// A compiler flag set of the corpus.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// Name used in `expect` files.
    pub name: &'static str,
    /// gcc flags.
    pub flags: &'static [&'static str],
    /// Extra link flags.
    pub link: &'static [&'static str],
    /// Variant whose expectation applies when the case gives none for this one.
    pub fallback: &'static str,
}

/// The variants every fixture is built with.
pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "O0",
        flags: &["-O0"],
        link: &[],
        fallback: "O0",
    },
    Variant {
        name: "O2",
        flags: &["-O2"],
        link: &[],
        fallback: "O2",
    },
    Variant {
        name: "O2g",
        flags: &["-O2", "-g"],
        link: &[],
        fallback: "O2",
    },
];

/// More flag sets gcc users build with: -Os, per-function sections with
/// CET, and non-PIC -O1 with -g3 macro info.
pub const MORE_VARIANTS: &[Variant] = &[
    Variant {
        name: "Os",
        flags: &["-Os"],
        link: &[],
        fallback: "O2",
    },
    Variant {
        name: "O2fs",
        flags: &[
            "-O2",
            "-g",
            "-ffunction-sections",
            "-fdata-sections",
            "-fcf-protection",
        ],
        link: &[],
        fallback: "O2",
    },
    Variant {
        name: "O1np",
        flags: &["-O1", "-g3", "-fno-pic"],
        link: &["-no-pie"],
        fallback: "O2",
    },
];

/// `gcc -S` of `src` into `out`.
pub fn compile_s(src: &Path, out: &Path, flags: &[&str], extra: &[String]) {
    run_ok(
        Command::new("gcc")
            .arg("-S")
            .args(flags)
            .args(extra)
            .arg(src)
            .arg("-o")
            .arg(out),
    )
    .unwrap();
}

/// The assembly gcc emits for `dir/src` under `variant` (computed once per test
/// binary; several tests share the corpus).
pub fn asm_of(dir: &Path, src: &str, variant: &Variant) -> String {
    use std::sync::{Arc, Mutex, OnceLock};
    type Cache =
        Mutex<std::collections::HashMap<(PathBuf, String, &'static str), Arc<OnceLock<String>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cell = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry((dir.to_path_buf(), src.to_string(), variant.name))
        .or_default()
        .clone();
    cell.get_or_init(|| {
        let tmp = testkit::Scratch::new().unwrap();
        let out = tmp.join("out.s");
        compile_s(&dir.join(src), &out, variant.flags, &case_flags(dir));
        std::fs::read_to_string(&out).unwrap()
    })
    .clone()
}

/// `gcc -c` of an assembly file.
pub fn assemble(s: &Path, o: &Path) {
    run_ok(
        Command::new("gcc")
            .args(["-c", "-x", "assembler"])
            .arg(s)
            .arg("-o")
            .arg(o),
    )
    .unwrap();
}

/// Links an object into an executable or (`shared`) a library.
pub fn link(o: &Path, out: &Path, shared: bool, flags: &[&str]) {
    let mut c = Command::new("gcc");
    if shared {
        c.arg("-shared");
    } else {
        c.args(flags);
    }
    run_ok(c.arg(o).arg("-o").arg(out)).unwrap();
}

/// (offset, type, target name, addend) of every relocation of a section.
pub type Reloc = (u64, u32, String, i64);

fn target_name(f: &object::File, t: RelocationTarget) -> String {
    match t {
        RelocationTarget::Symbol(i) => match f.symbol_by_index(i) {
            Ok(s) if s.kind() == object::SymbolKind::Section => {
                let sec = s.section_index().and_then(|i| f.section_by_index(i).ok());
                format!(
                    "[{}]",
                    sec.and_then(|s| s.name().ok().map(str::to_string))
                        .unwrap_or_default()
                )
            }
            Ok(s) => s.name().unwrap_or("?").to_string(),
            Err(_) => "?".into(),
        },
        RelocationTarget::Section(i) => format!(
            "[{}]",
            f.section_by_index(i)
                .and_then(|s| s.name().map(str::to_string))
                .unwrap_or_default()
        ),
        _ => "absolute".into(),
    }
}

/// Relocations of section `sec` of file `f`.
pub fn relocs(f: &object::File, sec: &object::Section) -> Vec<Reloc> {
    sec.relocations()
        .map(|(off, r)| {
            let ty = match r.flags() {
                RelocationFlags::Elf { r_type } => r_type,
                _ => 0,
            };
            (off, ty, target_name(f, r.target()), r.addend())
        })
        .collect()
}

/// Whether a section is patch output.
pub fn is_kpatch(name: &str) -> bool {
    name.starts_with(".kpatch")
}

/// Asserts the invariant: every non-`.kpatch` section of `aug` equals the one of
/// `orig` (bytes and relocations); `.eh_frame` may only grow at the end (FDEs of
/// the patch copies). Returns the section names of `aug` that are new.
pub fn assert_same_except_kpatch(orig: &Path, aug: &Path) -> Vec<String> {
    let (od, ad) = (std::fs::read(orig).unwrap(), std::fs::read(aug).unwrap());
    let (of, af) = (
        object::File::parse(&*od).unwrap(),
        object::File::parse(&*ad).unwrap(),
    );
    let mut new = Vec::new();
    // Sections are matched by name and occurrence: COMDAT groups (-g3
    // `.debug_macro`) repeat names.
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for asec in af.sections() {
        let name = asec.name().unwrap().to_string();
        if matches!(asec.kind(), SectionKind::Metadata | SectionKind::Linker) && name != ".eh_frame"
        {
            continue; // symtab, strtab, relocation sections (compared via relocations())
        }
        let k = *seen
            .entry(name.clone())
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let Some(osec) = of
            .sections()
            .filter(|s| s.name().ok() == Some(name.as_str()))
            .nth(k)
        else {
            assert!(
                is_kpatch(&name),
                "{}: new non-kpatch section {name}",
                aug.display()
            );
            new.push(name);
            continue;
        };
        if is_kpatch(&name) {
            continue;
        }
        let (ob, ab) = (osec.data().unwrap(), asec.data().unwrap());
        let (or, ar) = (relocs(&of, &osec), relocs(&af, &asec));
        if name == ".eh_frame" {
            assert_eh_frame_prefix(ob, ab, &format!("{}", aug.display()));
            assert!(
                ar.starts_with(&or),
                "{}: relocations of {name} of the original are not a prefix",
                aug.display()
            );
        } else if name.starts_with(".debug_line") {
            assert!(
                ab.starts_with(ob),
                "{}: {name} of the original is not a prefix",
                aug.display()
            );
            assert!(
                ar.starts_with(&or),
                "{}: relocations of {name} of the original are not a prefix",
                aug.display()
            );
        } else {
            assert_eq!(ob, ab, "{}: section {name} differs", aug.display());
            assert_eq!(or, ar, "{}: relocations of {name} differ", aug.display());
            assert_eq!(
                osec.size(),
                asec.size(),
                "{}: size of {name} differs",
                aug.display()
            );
        }
    }
    for osec in of.sections() {
        let name = osec.name().unwrap();
        assert!(
            af.section_by_name(name).is_some(),
            "{}: section {name} vanished",
            aug.display()
        );
    }
    new
}

/// `.eh_frame` records (CIE/FDE bodies, 4-byte length prefix) of an object.
fn eh_records(d: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + 4 <= d.len() {
        let len = u32::from_le_bytes(d[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 || at + 4 + len > d.len() {
            break;
        }
        v.push(&d[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    v
}

/// Every CIE/FDE of the original reappears, in order, at the start of the
/// augmented `.eh_frame` with the same instructions. Only the trailing
/// `DW_CFA_nop` padding may differ: gas pads the last FDE of a section to its
/// alignment, and the original's last FDE is no longer last.
fn assert_eh_frame_prefix(ob: &[u8], ab: &[u8], ctx: &str) {
    let (o, a) = (eh_records(ob), eh_records(ab));
    assert!(a.len() >= o.len(), "{ctx}: .eh_frame lost records");
    for (k, (x, y)) in o.iter().zip(&a).enumerate() {
        let trim = |r: &[u8]| r.len() - r.iter().rev().take_while(|&&b| b == 0).count();
        let (tx, ty) = (trim(x), trim(y));
        assert!(
            tx == ty && x[..tx] == y[..ty],
            "{ctx}: .eh_frame record {k} differs"
        );
    }
}

/// Multiset of (name, size) of the defined symbols of a linked file.
pub fn symbol_sizes(path: &Path) -> BTreeMap<(String, u64), usize> {
    let d = std::fs::read(path).unwrap();
    let f = object::File::parse(&*d).unwrap();
    let mut m = BTreeMap::new();
    for s in f.symbols() {
        let name = s.name().unwrap_or("").to_string();
        if name.is_empty() || s.is_undefined() {
            continue;
        }
        *m.entry((name, s.size())).or_insert(0) += 1;
    }
    m
}

/// Asserts every symbol of `orig` exists in `aug` with the same size (and count).
pub fn assert_original_symbols_kept(orig: &Path, aug: &Path) {
    let (o, a) = (symbol_sizes(orig), symbol_sizes(aug));
    for ((name, size), n) in &o {
        let got = a.get(&(name.clone(), *size)).copied().unwrap_or(0);
        assert!(
            got >= *n,
            "{}: symbol {name} (size {size}) missing or resized",
            aug.display()
        );
    }
}

/// Contents of `.kpatch.info` and the names of `.kpatch.strtab`, if present.
pub fn kpatch_info(obj: &Path) -> Option<(Vec<u8>, Vec<String>, Vec<Reloc>)> {
    let d = std::fs::read(obj).unwrap();
    let f = object::File::parse(&*d).unwrap();
    let info = f.section_by_name(".kpatch.info")?;
    let strtab = f.section_by_name(".kpatch.strtab")?;
    let names = strtab
        .data()
        .unwrap()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    Some((info.data().unwrap().to_vec(), names, relocs(&f, &info)))
}

/// Names of all sections of an object.
pub fn section_names(obj: &Path) -> Vec<String> {
    let d = std::fs::read(obj).unwrap();
    let f = object::File::parse(&*d).unwrap();
    f.sections()
        .map(|s| s.name().unwrap_or("").to_string())
        .collect()
}

/// Bytes of one section of a file.
pub fn section_bytes(path: &Path, name: &str) -> Vec<u8> {
    let d = std::fs::read(path).unwrap();
    let f = object::File::parse(&*d).unwrap();
    let s = f
        .section_by_name(name)
        .unwrap_or_else(|| panic!("{}: no {name}", path.display()));
    s.data().unwrap().to_vec()
}

/// All fixture cases of this crate.
pub fn cases() -> Vec<PathBuf> {
    let root = testkit::repo_root().join("tests").join("fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("gensrc-")
        })
        .collect();
    v.sort();
    v
}

/// Extra gcc flags of a case (`cflags` file).
pub fn case_flags(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cflags"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether a case links as a shared library (`link` file says `shared`).
pub fn case_shared(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("link"))
        .map(|s| s.trim() == "shared")
        .unwrap_or(false)
}
