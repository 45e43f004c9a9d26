//! From a linked patched binary and its original to a `.kpatch` file:
//! strip → `strip --strip-unneeded` → rel-fixup → undo-link → container.

use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection, ObjectSymbol};

/// Errors of the post-link pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The binary is not an ELF file we can read.
    #[error("{path}: not a readable ELF file: {reason}")]
    Elf {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The original binary has no GNU build-id, so a patch could not be matched to it.
    #[error("{0}: no GNU build-id note (link with --build-id)")]
    NoBuildId(PathBuf),
    /// A pipeline step failed.
    #[error("{step} of {path} failed: {reason}")]
    Step {
        /// The step (`strip`, `strip --strip-unneeded`, `rel-fixup`, `undo-link`, `make`).
        step: &'static str,
        /// The patched binary.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
}

/// Reads a whole file.
pub fn read_file(path: &Path) -> Result<Vec<u8>, PipelineError> {
    std::fs::read(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), PipelineError> {
    std::fs::write(path, data).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The GNU build-id of an ELF image, as lowercase hex.
pub fn build_id(path: &Path, data: &[u8]) -> Result<String, PipelineError> {
    let file = object::File::parse(data).map_err(|e| PipelineError::Elf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let id = file
        .build_id()
        .map_err(|e| PipelineError::Elf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| PipelineError::NoBuildId(path.to_path_buf()))?;
    Ok(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The functions a patched binary replaces or adds (its `<fn>.kpatch` symbols), or
/// `None` when it carries no `.kpatch.info` entries (nothing changed in it).
pub fn patched_functions(path: &Path, data: &[u8]) -> Result<Option<Vec<String>>, PipelineError> {
    let file = object::File::parse(data).map_err(|e| PipelineError::Elf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let Some(info) = file.section_by_name(".kpatch.info") else {
        return Ok(None);
    };
    // The table ends with an all-zero record; relocations fill the addresses, so a
    // linked table with any non-zero byte has entries.
    let has_entries = info.size() > 0
        && (info
            .data()
            .map(|d| d.iter().any(|&b| b != 0))
            .unwrap_or(false)
            || info.relocations().next().is_some());
    if !has_entries {
        return Ok(None);
    }
    // Copies of data (`__PRETTY_FUNCTION__.0.kpatch`, new counters) are no functions.
    let mut names: Vec<String> = file
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text)
        .filter_map(|s| s.name().ok()?.strip_suffix(".kpatch").map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    Ok(Some(names))
}

/// The data objects a patched binary adds (its `<name>.kpatch` data symbols: string
/// constants such as `__PRETTY_FUNCTION__.0`, new statics, counters), sorted.
pub fn patched_data(path: &Path, data: &[u8]) -> Result<Vec<String>, PipelineError> {
    let file = object::File::parse(data).map_err(|e| PipelineError::Elf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut names: Vec<String> = file
        .symbols()
        // The differ's copies of data carry no `.type` (NOTYPE): anything but code,
        // sections and files.
        .filter(|s| {
            !matches!(
                s.kind(),
                object::SymbolKind::Text | object::SymbolKind::Section | object::SymbolKind::File
            )
        })
        .filter_map(|s| s.name().ok()?.strip_suffix(".kpatch").map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks that every function of the original binary is in the patched binary with the
/// same size: the patched link must carry the original code unchanged beside the
/// `.kpatch` copies, or the patch's addresses would not fit the running original.
pub fn check_same_functions(
    original: &Path,
    orig: &[u8],
    patched: &Path,
    new: &[u8],
) -> Result<(), PipelineError> {
    let funcs = |path: &Path, data: &[u8]| -> Result<Vec<(String, u64)>, PipelineError> {
        let file = object::File::parse(data).map_err(|e| PipelineError::Elf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut v: Vec<(String, u64)> = file
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.is_definition() && s.size() > 0)
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.size())))
            .filter(|(n, _)| !n.ends_with(".kpatch"))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut new_funcs = funcs(patched, new)?;
    for (name, size) in funcs(original, orig)? {
        match new_funcs.iter().position(|(n, s)| *n == name && *s == size) {
            Some(i) => {
                new_funcs.swap_remove(i);
            }
            None => {
                return Err(PipelineError::Step {
                    step: "code check",
                    path: patched.to_path_buf(),
                    reason: format!(
                        "original function {name} ({size} bytes) is not in the patched \
                         binary unchanged; refusing to make a patch for it"
                    ),
                })
            }
        }
    }
    Ok(())
}

/// Turns `patched` (linked with `-Wl,-q`, carrying `.kpatch.*` sections) into a
/// `.kpatch` file for `original`; intermediate files go into `scratch`.
pub fn make_kpatch(
    original: &Path,
    patched: &Path,
    patch_id: Option<&str>,
    scratch: &Path,
) -> Result<(String, Vec<u8>), PipelineError> {
    let orig = read_file(original)?;
    let bid_hex = build_id(original, &orig)?;
    let patch = read_file(patched)?;
    check_same_functions(original, &orig, patched, &patch)?;
    let step_err = |step: &'static str, reason: String| PipelineError::Step {
        step,
        path: patched.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(scratch).map_err(|source| PipelineError::Io {
        path: scratch.to_path_buf(),
        source,
    })?;
    let stripped = patch_elf::strip(&patch).map_err(|e| step_err("strip", e.to_string()))?;
    let stripped_path = scratch.join("stripped");
    write_file(&stripped_path, &stripped)?;
    let out = Command::new("strip")
        .arg("--strip-unneeded")
        .arg(&stripped_path)
        .output()
        .map_err(|e| step_err("strip --strip-unneeded", e.to_string()))?;
    if !out.status.success() {
        return Err(step_err(
            "strip --strip-unneeded",
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let stripped = read_file(&stripped_path)?;
    let fixed =
        patch_elf::rel_fixup(&orig, &stripped).map_err(|e| step_err("rel-fixup", e.to_string()))?;
    write_file(&scratch.join("fixed"), &fixed)?;
    let rel =
        patch_elf::undo_link(&orig, &fixed).map_err(|e| step_err("undo-link", e.to_string()))?;
    write_file(&scratch.join("rel"), &rel)?;
    let bid = kpatch_file::BuildId::parse(&bid_hex).map_err(|e| step_err("make", e.to_string()))?;
    let pid = patch_id
        .map(kpatch_file::PatchId::parse)
        .transpose()
        .map_err(|e| step_err("make", e.to_string()))?;
    let bytes = kpatch_file::make(&rel, &bid, pid.as_ref(), kpatch_file::Layout::LibCarePlus)
        .map_err(|e| step_err("make", e.to_string()))?;
    Ok((bid_hex, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(dir: &Path, name: &str, body: &str) -> (PathBuf, Vec<u8>) {
        let c = dir.join(format!("{name}.c"));
        let exe = dir.join(name);
        std::fs::write(
            &c,
            format!("int f(int x) {{ {body} }}\nint main(void) {{ return f(1); }}\n"),
        )
        .unwrap();
        let out = Command::new("gcc")
            .arg("-O2")
            .arg(&c)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&exe).unwrap();
        (exe, data)
    }

    #[test]
    fn a_patched_binary_whose_original_function_changed_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = program(dir.path(), "a", "return x + 1;");
        let (b, db) = program(dir.path(), "b", "return x + 1;");
        check_same_functions(&a, &da, &b, &db).unwrap();
        let (c, dc) = program(dir.path(), "c", "return x * x * x + (x >> 3) - 7 * x;");
        let err = check_same_functions(&a, &da, &c, &dc)
            .unwrap_err()
            .to_string();
        assert!(err.contains("code check"), "{err}");
        assert_eq!(build_id(&a, &da).unwrap().len(), 40);
        assert!(
            patched_functions(&a, &da).unwrap().is_none(),
            "a plain binary has no patch"
        );
    }
}
