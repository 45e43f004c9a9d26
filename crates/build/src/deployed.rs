//! Matching the original stage's outputs against binaries already deployed.
//!
//! A patch is only useful for the binary that is really running. When the operator
//! names the deployed file (`livecare build --target /usr/sbin/server`), the original
//! stage must have rebuilt it bit for bit (same GNU build-id); if not, we say so and
//! show what differs, instead of producing a patch that `patch` would later refuse.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::pipeline;
use crate::project::OriginalOutput;

/// Which original output a deployed file corresponds to, or why none does.
pub fn match_deployed(deployed: &Path, originals: &[OriginalOutput]) -> Result<PathBuf, String> {
    let data = pipeline::read_file(deployed).map_err(|e| e.to_string())?;
    let want = pipeline::build_id(deployed, &data).map_err(|e| e.to_string())?;
    if let Some(o) = originals.iter().find(|o| o.build_id == want) {
        return Ok(o.path.clone());
    }
    let name = deployed.file_name().unwrap_or_default();
    let Some(same_name) = originals.iter().find(|o| o.path.file_name() == Some(name)) else {
        let built: Vec<String> = originals
            .iter()
            .map(|o| o.path.display().to_string())
            .collect();
        return Err(format!(
            "the deployed {} (build-id {want}) matches no output of the original build \
             (built: {})",
            deployed.display(),
            built.join(", ")
        ));
    };
    let built = pipeline::read_file(&same_name.stash).map_err(|e| e.to_string())?;
    let why = differences(&data, &built);
    Err(format!(
        "the original build of {} has build-id {}, but the deployed {} has build-id {want}: \
         a patch built from this tree would not apply to it. Rebuild with the same compiler, \
         flags and source path as the deployed binary. Differences: {}",
        same_name.path.display(),
        same_name.build_id,
        deployed.display(),
        if why.is_empty() {
            "none in code sizes or compiler version (the source or a build stamp differs)"
                .to_string()
        } else {
            why.join("; ")
        }
    ))
}

/// Human-readable differences between two builds of one program: compiler version
/// and the sizes of the loaded sections.
pub fn differences(deployed: &[u8], built: &[u8]) -> Vec<String> {
    let (Ok(d), Ok(b)) = (object::File::parse(deployed), object::File::parse(built)) else {
        return vec!["one of the files is not a readable ELF".into()];
    };
    let mut out = Vec::new();
    let comment = |f: &object::File| {
        f.section_by_name(".comment")
            .and_then(|s| s.data().ok())
            .map(|d| {
                String::from_utf8_lossy(d)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let (cd, cb) = (comment(&d), comment(&b));
    if cd != cb {
        out.push(format!("compiler: deployed {cd:?}, built {cb:?}"));
    }
    for name in [
        ".text",
        ".rodata",
        ".data",
        ".bss",
        ".init_array",
        ".dynsym",
    ] {
        let size = |f: &object::File| f.section_by_name(name).map(|s| s.size());
        let (sd, sb) = (size(&d), size(&b));
        if sd != sb {
            out.push(format!("{name} size: deployed {sd:?}, built {sb:?}"));
        }
    }
    let has_debug = |f: &object::File| f.section_by_name(".debug_info").is_some();
    if has_debug(&d) != has_debug(&b) && out.is_empty() {
        out.push(format!(
            "debug info: deployed {}, built {} (a -g difference changes the build-id)",
            has_debug(&d),
            has_debug(&b)
        ));
    }
    out
}

/// Before any build: the deployed binary's debug info records where it was built
/// (`DW_AT_comp_dir` + `DW_AT_name` of each compile unit). Those paths are part of the
/// binary, so a build of a tree at another path cannot reproduce its build-id; say so
/// now, naming both paths, instead of after the whole original build. Binaries without
/// debug info, or built with relative paths (`-ffile-prefix-map=...=.`), pass.
pub fn check_build_dir(deployed: &Path, srcdir: &Path) -> Result<(), String> {
    let Ok(data) = std::fs::read(deployed) else {
        return Ok(()); // match_deployed reports an unreadable file
    };
    let sources = compile_unit_paths(&data);
    if sources.is_empty() || sources.iter().any(|p| p.starts_with(srcdir)) {
        return Ok(());
    }
    // The tree each source was compiled in: its path without the longest tail that
    // exists in this tree (/A/src/http/f.c and ./src/http/f.c: /A).
    let mut roots: Vec<(PathBuf, usize)> = Vec::new();
    for p in &sources {
        let Some(root) = tree_root(p, srcdir) else {
            continue;
        };
        match roots.iter_mut().find(|(r, _)| *r == root) {
            Some((_, n)) => *n += 1,
            None => roots.push((root, 1)),
        }
    }
    let Some((root, n)) = roots.into_iter().max_by_key(|(_, n)| *n) else {
        return Ok(());
    };
    if root.canonicalize().is_ok_and(|r| r == srcdir) {
        return Ok(());
    }
    Err(format!(
        "the deployed {} was built in {} (its debug info says so for {n} of its {} compile \
         units), but this tree is {}: the source path is part of the binary (DW_AT_comp_dir), \
         so a build here cannot reproduce its build-id and no patch for it can be made. Run \
         `livecare build` on the tree at {} (the tree is never changed), or on a copy of this \
         source placed at that path",
        deployed.display(),
        root.display(),
        sources.len(),
        srcdir.display(),
        root.display()
    ))
}

/// `tail` of `path` (a source file's absolute path) that names an existing file in
/// `srcdir`, longest first; returns the part of `path` before it.
fn tree_root(path: &Path, srcdir: &Path) -> Option<PathBuf> {
    let parts: Vec<_> = path.components().collect();
    (1..parts.len()).find_map(|i| {
        let tail: PathBuf = parts[i..].iter().collect();
        srcdir
            .join(&tail)
            .is_file()
            .then(|| parts[..i].iter().collect())
    })
}

/// The absolute source paths of the compile units in `data`'s `.debug_info`
/// (comp_dir joined with name); empty without debug info or with relative paths.
fn compile_unit_paths(data: &[u8]) -> Vec<PathBuf> {
    use gimli::{EndianSlice, RunTimeEndian};
    use std::borrow::Cow;
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let load = |id: gimli::SectionId| -> Result<Cow<[u8]>, gimli::Error> {
        Ok(file
            .section_by_name(id.name())
            .and_then(|s| s.uncompressed_data().ok())
            .unwrap_or(Cow::Borrowed(&[])))
    };
    let Ok(owned) = gimli::DwarfSections::load(load) else {
        return Vec::new();
    };
    let dwarf = owned.borrow(|s| EndianSlice::new(s, endian));
    let mut out = Vec::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let text = |r: Option<EndianSlice<RunTimeEndian>>| {
            r.map(|s| PathBuf::from(String::from_utf8_lossy(s.slice()).into_owned()))
        };
        let Some(name) = text(unit.name) else {
            continue;
        };
        let full = match text(unit.comp_dir) {
            _ if name.is_absolute() => name,
            Some(dir) if dir.is_absolute() => dir.join(name),
            _ => continue,
        };
        out.push(full);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A program built in `a` (relative source path, as make does) is named as built
    /// there when checked against an identical tree `b`, and passes against `a`.
    #[test]
    fn build_dir_of_deployed_binary_is_checked_before_the_build() {
        let (a, b) = (
            testkit::Scratch::new().unwrap(),
            testkit::Scratch::new().unwrap(),
        );
        for t in [&a, &b] {
            t.write("src/main.c", "int main(void) { return 0; }\n")
                .unwrap();
        }
        let exe = a.join("prog");
        let st = Command::new("gcc")
            .args(["-g", "-O2", "src/main.c", "-o", "prog"])
            .current_dir(a.path())
            .status()
            .unwrap();
        assert!(st.success());
        let (a_real, b_real) = (
            a.path().canonicalize().unwrap(),
            b.path().canonicalize().unwrap(),
        );
        let err = check_build_dir(&exe, &b_real).unwrap_err();
        assert!(
            err.contains(&format!("built in {} ", a_real.display()))
                && err.contains(&b_real.display().to_string()),
            "{err}"
        );
        check_build_dir(&exe, &a_real).unwrap();
        // Relative paths in the debug info (Debian's -ffile-prefix-map) say nothing.
        let st = Command::new("gcc")
            .args(["-g", "-O2", "src/main.c", "-o", "prog"])
            .arg(format!("-ffile-prefix-map={}=.", a_real.display()))
            .current_dir(a.path())
            .status()
            .unwrap();
        assert!(st.success());
        check_build_dir(&exe, &b_real).unwrap();
    }
}
