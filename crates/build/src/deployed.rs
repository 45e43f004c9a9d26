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
    out.extend(producer_difference(deployed, built));
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
    // Same sizes: a build stamp (a date, a host name) shows as the first constant
    // that differs.
    if out.is_empty() {
        for name in [".rodata", ".data"] {
            let bytes = |f: &object::File| {
                f.section_by_name(name)
                    .and_then(|s| s.data().ok())
                    .map(<[u8]>::to_vec)
            };
            let (Some(sd), Some(sb)) = (bytes(&d), bytes(&b)) else {
                continue;
            };
            if let Some(at) = sd.iter().zip(&sb).position(|(x, y)| x != y) {
                out.push(format!(
                    "{name} differs at +{at:#x}: deployed {:?}, built {:?} (a build stamp?)",
                    text_around(&sd, at),
                    text_around(&sb, at)
                ));
                break;
            }
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

/// The printable text around offset `at` of `data` (at most 64 bytes each side).
fn text_around(data: &[u8], at: usize) -> String {
    let printable = |c: &u8| c.is_ascii_graphic() || *c == b' ';
    let start = (at.saturating_sub(64)..at)
        .rev()
        .find(|&i| !printable(&data[i]))
        .map_or(at.saturating_sub(64), |i| i + 1);
    let end = (at..data.len().min(at + 64))
        .find(|&i| !printable(&data[i]))
        .unwrap_or(data.len().min(at + 64));
    String::from_utf8_lossy(&data[start..end.max(start)]).into_owned()
}

/// Where a deployed binary was built, when that is not the tree given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltElsewhere {
    /// The tree path its compile units name (`DW_AT_comp_dir`, common root).
    pub root: PathBuf,
    /// How many compile units name `root`.
    pub units: usize,
    /// How many compile units name an absolute source path.
    pub total: usize,
}

/// Before any build: the deployed binary's debug info records where it was built
/// (`DW_AT_comp_dir` + `DW_AT_name` of each compile unit). Those paths are part of the
/// binary, so a build of a tree at another path must see the tree at that path (or
/// map it there) to reproduce its build-id. None when it was built in `srcdir`, or
/// records no absolute paths (no debug info, `-ffile-prefix-map=...=.`).
pub fn built_elsewhere(deployed: &Path, srcdir: &Path) -> Option<BuiltElsewhere> {
    let data = std::fs::read(deployed).ok()?; // match_deployed reports an unreadable file
    let sources = compile_unit_paths(&data);
    if sources.is_empty() || sources.iter().any(|p| p.starts_with(srcdir)) {
        return None;
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
    let (root, units) = roots.into_iter().max_by_key(|(_, n)| *n)?;
    if root.canonicalize().is_ok_and(|r| r == srcdir) {
        return None;
    }
    Some(BuiltElsewhere {
        root,
        units,
        total: sources.len(),
    })
}

/// The message for a deployed binary built elsewhere whose paths cannot be reproduced
/// here (`why`).
pub fn cannot_reproduce(deployed: &Path, srcdir: &Path, e: &BuiltElsewhere, why: &str) -> String {
    format!(
        "the deployed {} was built in {} (its debug info says so for {} of its {} compile \
         units), but this tree is {}: the source path is part of the binary \
         (DW_AT_comp_dir), and a build here cannot reproduce it: {why}. Run `livecare \
         build` on the tree at {} (the tree is never changed), or on a copy of this source \
         placed at that path",
        deployed.display(),
        e.root.display(),
        e.units,
        e.total,
        srcdir.display(),
        e.root.display()
    )
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
    compile_units(data)
        .into_iter()
        .filter_map(|u| {
            let name = PathBuf::from(u.name?);
            match u.comp_dir.map(PathBuf::from) {
                _ if name.is_absolute() => Some(name),
                Some(dir) if dir.is_absolute() => Some(dir.join(name)),
                _ => None,
            }
        })
        .collect()
}

/// What one compile unit records about its compile.
struct UnitInfo {
    name: Option<String>,
    comp_dir: Option<String>,
    producer: Option<String>,
}

/// The compile units of `data`'s `.debug_info` (none without debug info).
fn compile_units(data: &[u8]) -> Vec<UnitInfo> {
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
        let text =
            |r: Option<EndianSlice<RunTimeEndian>>| r.map(|s| s.to_string_lossy().into_owned());
        let producer = unit
            .entries()
            .next_dfs()
            .ok()
            .flatten()
            .and_then(|(_, die)| die.attr_value(gimli::DW_AT_producer).ok().flatten())
            .and_then(|v| dwarf.attr_string(&unit, v).ok())
            .map(|s| s.to_string_lossy().into_owned());
        out.push(UnitInfo {
            name: text(unit.name),
            comp_dir: text(unit.comp_dir),
            producer,
        });
    }
    out
}

/// The compilers and flags the compile units of `data` record (`DW_AT_producer`).
fn producers(data: &[u8]) -> std::collections::BTreeSet<String> {
    compile_units(data)
        .into_iter()
        .filter_map(|u| u.producer)
        .collect()
}

/// How the compile flags (`DW_AT_producer`) of two builds differ: the words each
/// build's units record that the other's never do.
fn producer_difference(deployed: &[u8], built: &[u8]) -> Option<String> {
    let (d, b) = (producers(deployed), producers(built));
    if d == b || d.is_empty() || b.is_empty() {
        return None;
    }
    let words = |set: &std::collections::BTreeSet<String>| -> std::collections::BTreeSet<String> {
        set.iter()
            .flat_map(|p| p.split_whitespace().map(str::to_string))
            .collect()
    };
    let (wd, wb) = (words(&d), words(&b));
    let only = |a: &std::collections::BTreeSet<String>, b: &std::collections::BTreeSet<String>| {
        a.difference(b).cloned().collect::<Vec<_>>().join(" ")
    };
    let (od, ob) = (only(&wd, &wb), only(&wb, &wd));
    Some(if od.is_empty() && ob.is_empty() {
        "compile flags (DW_AT_producer): the same flags, combined differently across units"
            .to_string()
    } else {
        format!(
            "compile flags (DW_AT_producer): deployed only [{od}], built only [{ob}] \
             (the deployed build used other CFLAGS or another compiler)"
        )
    })
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
        let e = built_elsewhere(&exe, &b_real).unwrap();
        assert_eq!(e.root, a_real);
        assert_eq!(built_elsewhere(&exe, &a_real), None);
        let data = std::fs::read(&exe).unwrap();
        assert!(
            producers(&data).iter().any(|p| p.contains(" -O2")),
            "{:?}",
            producers(&data)
        );
        // Relative paths in the debug info (Debian's -ffile-prefix-map) say nothing.
        let st = Command::new("gcc")
            .args(["-g", "-O2", "src/main.c", "-o", "prog"])
            .arg(format!("-ffile-prefix-map={}=.", a_real.display()))
            .current_dir(a.path())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(built_elsewhere(&exe, &b_real), None);
    }

    /// Two builds that differ only in a stamp of the same length name the stamp.
    #[test]
    fn a_build_stamp_of_the_same_size_is_named() {
        let dir = testkit::Scratch::new().unwrap();
        let build = |stamp: &str, out: &str| {
            dir.write(
                "s.c",
                format!(
                    "#include <stdio.h>\nconst char *stamp = \"{stamp}\";\n\
                     int main(void) {{ puts(stamp); return 0; }}\n"
                ),
            )
            .unwrap();
            let st = Command::new("gcc")
                .args(["-O2", "s.c", "-o", out])
                .current_dir(dir.path())
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read(dir.join(out)).unwrap()
        };
        let (d, b) = (build("host-1765150001", "d"), build("host-1765159999", "b"));
        let why = differences(&d, &b).join("; ");
        assert!(
            why.contains("deployed \"host-1765150001\", built \"host-1765159999\""),
            "{why}"
        );
    }
}
