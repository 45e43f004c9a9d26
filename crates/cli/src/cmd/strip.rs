//! `kpatch_strip --strip IN OUT | --rel-fixup ORIG PATCH | --undo-link ORIG PATCH`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

/// Flags of `kpatch_strip` (exactly one mode).
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["strip", "rel_fixup", "undo_link"])))]
pub struct Args {
    /// Keep only the .kpatch* sections (plus .eh_frame, relocations, symbol tables) of IN; write OUT.
    #[arg(long, num_args = 2, value_names = ["IN", "OUT"])]
    pub strip: Option<Vec<PathBuf>>,
    /// Rewrite PATCH's relocations for the applier, using the original binary ORIG (PATCH is rewritten in place).
    #[arg(long = "rel-fixup", num_args = 2, value_names = ["ORIG", "PATCH"])]
    pub rel_fixup: Option<Vec<PathBuf>>,
    /// Make PATCH relocatable (section-relative offsets, ET_REL), using ORIG (PATCH is rewritten in place).
    #[arg(long = "undo-link", num_args = 2, value_names = ["ORIG", "PATCH"])]
    pub undo_link: Option<Vec<PathBuf>>,
}

/// Runs `kpatch_strip`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(p) = args.strip.as_deref() {
        let input = read(&p[0])?;
        let out =
            patch_elf::strip(&input).with_context(|| format!("stripping {}", p[0].display()))?;
        write_atomically(&p[1], &out)?;
    } else if let Some(p) = args.rel_fixup.as_deref() {
        let orig = read(&p[0])?;
        let patch = read(&p[1])?;
        let out = patch_elf::rel_fixup(&orig, &patch).with_context(|| {
            format!("rel-fixup of {} against {}", p[1].display(), p[0].display())
        })?;
        write_atomically(&p[1], &out)?;
    } else if let Some(p) = args.undo_link.as_deref() {
        let orig = read(&p[0])?;
        let patch = read(&p[1])?;
        let out = patch_elf::undo_link(&orig, &patch).with_context(|| {
            format!("undo-link of {} against {}", p[1].display(), p[0].display())
        })?;
        write_atomically(&p[1], &out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a whole file; `std::fs::read` opens read-only, so a running ORIG ("Text file busy") is fine.
fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `data` to a temporary file next to `path`, then renames it over `path`, so a
/// failure never leaves a half-written patch behind.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".kpatch_strip-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    // Keep the mode of a file rewritten in place; a new file gets the usual 0644.
    let perm = std::fs::metadata(path)
        .map(|m| m.permissions())
        .unwrap_or_else(|_| std::os::unix::fs::PermissionsExt::from_mode(0o644));
    tmp.as_file()
        .set_permissions(perm)
        .with_context(|| format!("setting the mode of {}", tmp.path().display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
