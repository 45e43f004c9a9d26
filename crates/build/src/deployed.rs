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
