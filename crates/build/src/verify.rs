//! Proof that a patched-stage object keeps the original code: every executable section
//! outside `.kpatch*` has the same bytes as in the original object (relocated fields
//! masked, since making a symbol global turns a resolved call into a relocation), and
//! every original function is still there with the same place and size.

use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SymbolKind};

/// Why a patched object does not keep the original code.
#[derive(Debug, thiserror::Error)]
pub enum CodeMismatch {
    /// An object could not be parsed.
    #[error("cannot parse {which} object: {reason}")]
    Parse {
        /// "original" or "patched".
        which: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// A code section is missing from the patched object.
    #[error("code section {section} (#{index}) is missing")]
    MissingSection {
        /// Section name.
        section: String,
        /// Its occurrence among sections of that name.
        index: usize,
    },
    /// A code section changed size.
    #[error("code section {section} changed size from {orig} to {new} bytes")]
    Size {
        /// Section name.
        section: String,
        /// Original size.
        orig: u64,
        /// New size.
        new: u64,
    },
    /// A code section's bytes differ.
    #[error("code section {section} differs at offset {offset:#x}")]
    Bytes {
        /// Section name.
        section: String,
        /// First differing offset.
        offset: usize,
    },
    /// A data symbol changed binding or definition (e.g. a file-local variable became
    /// a global common symbol), which would make patch code refer to another object.
    #[error("variable {name} changed from {orig} to {new}")]
    Variable {
        /// Symbol name.
        name: String,
        /// Original binding and definition.
        orig: String,
        /// New binding and definition.
        new: String,
    },
    /// An original function moved, changed size or disappeared.
    #[error("function {name} ({section}+{value:#x}, {size} bytes) is not in the patched object unchanged")]
    Function {
        /// Symbol name.
        name: String,
        /// Section name.
        section: String,
        /// Offset in the section.
        value: u64,
        /// Size.
        size: u64,
    },
}

/// One executable section: name, bytes, and which bytes are relocated.
struct CodeSection {
    name: String,
    data: Vec<u8>,
    relocated: Vec<bool>,
}

fn code_sections(file: &object::File<'_>) -> Vec<CodeSection> {
    let mut out = Vec::new();
    for section in file.sections() {
        let SectionFlags::Elf { sh_flags } = section.flags() else {
            continue;
        };
        if sh_flags & u64::from(object::elf::SHF_EXECINSTR) == 0 {
            continue;
        }
        let name = section.name().unwrap_or("").to_string();
        if name.starts_with(".kpatch") {
            continue;
        }
        let data = section.data().map(<[u8]>::to_vec).unwrap_or_default();
        let mut relocated = vec![false; data.len()];
        for (offset, reloc) in section.relocations() {
            let width = usize::from(reloc.size() / 8).max(4);
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            for flag in relocated.iter_mut().skip(start).take(width) {
                *flag = true;
            }
        }
        out.push(CodeSection {
            name,
            data,
            relocated,
        });
    }
    out
}

type FuncKey = (String, String, u64, u64);

fn functions(file: &object::File<'_>) -> Vec<FuncKey> {
    file.symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter_map(|s| {
            let section = file.section_by_index(s.section_index()?).ok()?;
            let name = s.name().ok()?.to_string();
            if name.ends_with(".kpatch") {
                return None;
            }
            Some((
                name,
                section.name().ok()?.to_string(),
                s.address(),
                s.size(),
            ))
        })
        .collect()
}

/// Binding and definition of every named data symbol (variables, commons).
fn variables(file: &object::File<'_>) -> Vec<(String, String)> {
    file.symbols()
        .filter(|s| {
            matches!(
                s.kind(),
                SymbolKind::Data | SymbolKind::Unknown | SymbolKind::Tls
            )
        })
        .filter(|s| s.is_definition() || s.is_common())
        .filter_map(|s| {
            let name = s.name().ok()?;
            if name.is_empty() || name.starts_with(".L") || name.ends_with(".kpatch") {
                return None;
            }
            let binding = if s.is_local() {
                "local"
            } else if s.is_weak() {
                "weak"
            } else {
                "global"
            };
            let def = if s.is_common() { "common" } else { "defined" };
            Some((name.to_string(), format!("{binding} {def}")))
        })
        .collect()
}

/// Checks that `patched` (a relocatable object) keeps every code byte and function of
/// `original`, ignoring `.kpatch*` sections and relocated fields.
pub fn same_code(original: &[u8], patched: &[u8]) -> Result<(), CodeMismatch> {
    let parse = |which, data| {
        object::File::parse(data).map_err(|e| CodeMismatch::Parse {
            which,
            reason: e.to_string(),
        })
    };
    let orig = parse("original", original)?;
    let new = parse("patched", patched)?;
    let new_sections = code_sections(&new);
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    for o in code_sections(&orig) {
        let index = *seen
            .entry(o.name.clone())
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let Some(n) = new_sections.iter().filter(|n| n.name == o.name).nth(index) else {
            return Err(CodeMismatch::MissingSection {
                section: o.name,
                index,
            });
        };
        if n.data.len() != o.data.len() {
            return Err(CodeMismatch::Size {
                section: o.name,
                orig: o.data.len() as u64,
                new: n.data.len() as u64,
            });
        }
        let differs = (0..o.data.len())
            .find(|&i| !o.relocated[i] && !n.relocated[i] && o.data[i] != n.data[i]);
        if let Some(offset) = differs {
            return Err(CodeMismatch::Bytes {
                section: o.name,
                offset,
            });
        }
    }
    let new_vars = variables(&new);
    for (name, orig_desc) in variables(&orig) {
        let found = new_vars
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.clone());
        if found.as_deref() != Some(orig_desc.as_str()) {
            let new = found.unwrap_or_else(|| "missing".to_string());
            return Err(CodeMismatch::Variable {
                name,
                orig: orig_desc,
                new,
            });
        }
    }
    let new_funcs = functions(&new);
    for f in functions(&orig) {
        if !new_funcs.contains(&f) {
            let (name, section, value, size) = f;
            return Err(CodeMismatch::Function {
                name,
                section,
                value,
                size,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Assembles `asm` with the system toolchain into an object.
    fn assemble(dir: &std::path::Path, name: &str, asm: &str) -> Vec<u8> {
        let s = dir.join(format!("{name}.s"));
        let o = dir.join(format!("{name}.o"));
        std::fs::write(&s, asm).unwrap();
        let out = Command::new("gcc")
            .arg("-c")
            .arg(&s)
            .arg("-o")
            .arg(&o)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&o).unwrap()
    }

    const BASE: &str = "\t.text\n\t.type helper, @function\nhelper:\n\tmovl counter(%rip), %eax\n\tret\n\t.size helper, .-helper\n\t.globl f\n\t.type f, @function\nf:\n\tcall helper\n\taddl $1, %eax\n\tret\n\t.size f, .-f\n";

    #[test]
    fn identical_code_with_extra_kpatch_sections_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let vars = "\t.local counter\n\t.comm counter,4,4\n";
        let a = assemble(dir.path(), "a", &format!("{BASE}{vars}"));
        let extra = "\t.section .kpatch.text,\"ax\",@progbits\nf.kpatch:\n\tmovl $2, %eax\n\tret\n";
        let b = assemble(dir.path(), "b", &format!("{BASE}{vars}{extra}"));
        same_code(&a, &b).unwrap();
    }

    #[test]
    fn a_call_that_became_a_relocation_is_not_a_code_change() {
        let dir = tempfile::tempdir().unwrap();
        let vars = "\t.local counter\n\t.comm counter,4,4\n";
        let a = assemble(dir.path(), "a", &format!("{BASE}{vars}"));
        // --force-global style: the local helper is made global, so the assembler leaves
        // the call displacement to a relocation.
        let b = assemble(dir.path(), "b", &format!("\t.globl helper\n{BASE}{vars}"));
        same_code(&a, &b).unwrap();
    }

    #[test]
    fn a_changed_instruction_is_refused_naming_the_section() {
        let dir = tempfile::tempdir().unwrap();
        let vars = "\t.local counter\n\t.comm counter,4,4\n";
        let a = assemble(dir.path(), "a", &format!("{BASE}{vars}"));
        let b = assemble(
            dir.path(),
            "b",
            &format!("{}{vars}", BASE.replace("$1", "$2")),
        );
        let err = same_code(&a, &b).unwrap_err();
        assert!(
            matches!(&err, CodeMismatch::Bytes { section, .. } if section == ".text"),
            "{err}"
        );
    }

    #[test]
    fn a_file_local_variable_turned_common_global_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = assemble(
            dir.path(),
            "a",
            &format!("{BASE}\t.local counter\n\t.comm counter,4,4\n"),
        );
        let b = assemble(dir.path(), "b", &format!("{BASE}\t.comm counter,4,4\n"));
        let err = same_code(&a, &b).unwrap_err();
        assert!(
            matches!(&err, CodeMismatch::Variable { name, .. } if name == "counter"),
            "{err}"
        );
    }

    #[test]
    fn a_dropped_function_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vars = "\t.local counter\n\t.comm counter,4,4\n";
        let a = assemble(dir.path(), "a", &format!("{BASE}{vars}"));
        let b = assemble(
            dir.path(),
            "b",
            &format!("{}{vars}", BASE.replace("\t.size f, .-f\n", "")),
        );
        assert!(matches!(
            same_code(&a, &b),
            Err(CodeMismatch::Function { .. })
        ));
        assert!(matches!(
            same_code(b"junk", &a),
            Err(CodeMismatch::Parse {
                which: "original",
                ..
            })
        ));
    }
}
