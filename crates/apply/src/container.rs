//! Loading patches: a `.kpatch` file, a directory of `<buildid>.kpatch`, or LibCare
//! storage (`<buildid>/latest/kpatch.bin`, levels `<buildid>/<N>/kpatch.bin`).
//! [`DirLookup`] says which files of a directory count.

use std::path::{Path, PathBuf};

use crate::Error;

/// A patch read from disk: which object it is for, its id and the relocatable ELF.
#[derive(Debug, Clone)]
pub struct Patch {
    /// GNU build-id (hex) of the object the patch applies to.
    pub build_id: String,
    /// Patch id from the header (LibcarePlus), or empty.
    pub patch_id: String,
    /// Patch level (LibCare storage `<buildid>/<N>/`), 0 when not from storage.
    pub level: u32,
    /// The inner relocatable ELF.
    pub elf: Vec<u8>,
    /// Where it came from.
    pub source: PathBuf,
    /// FNV-1a hash of the ELF, to detect applying the same patch twice.
    pub hash: u64,
}

fn is_hex_id(b: &[u8]) -> bool {
    b.len() >= 40 && b[..40].iter().all(|c| c.is_ascii_hexdigit())
}

pub use kpatch_file::fnv1a;

impl Patch {
    /// The id this patch is known by in reports and region headers: the header's patch
    /// id (or the storage level's `level-N`), else the hash of its ELF, as
    /// [`kpatch_file::patch_identity`] (what `build` and `inspect` print).
    pub fn id(&self) -> String {
        if self.patch_id.is_empty() {
            format!("{:016x}", self.hash)
        } else {
            self.patch_id.clone()
        }
    }
}

/// Parses a `.kpatch` container (both LibCare and LibcarePlus header layouts), with
/// the header and the inner ELF fully validated by `kpatch_file`.
pub fn parse_container(bytes: &[u8], source: &Path) -> Result<Patch, Error> {
    let pf = kpatch_file::PatchFile::parse(bytes).map_err(|e| Error::BadPatch {
        path: source.to_path_buf(),
        what: e.to_string(),
    })?;
    let build_id = pf.header().build_id().as_str().to_ascii_lowercase();
    let patch_id = pf
        .header()
        .patch_id()
        .map(|p| p.as_str().trim().to_string())
        .unwrap_or_default();
    let elf = pf.elf().to_vec();
    let hash = fnv1a(&elf);
    Ok(Patch {
        build_id,
        patch_id,
        level: 0,
        elf,
        source: source.to_path_buf(),
        hash,
    })
}

/// Reads one patch file.
pub fn read_patch_file(path: &Path) -> Result<Patch, Error> {
    let bytes = read_patch_bytes(path)?;
    parse_container(&bytes, path)
}

/// Bytes of the header that [`read_patch_bytes`] reads first (the larger layout).
const HEADER_PREFIX: u64 = 688;

/// Reads a patch file's bytes, checking the size its header declares (`total_size`)
/// against the size `fstat` gives before reading the rest: a 20 GiB sparse file is then
/// refused after reading 688 bytes instead of being read whole.
pub fn read_patch_bytes(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let io = |err| Error::Io {
        path: path.to_path_buf(),
        err,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(HEADER_PREFIX as usize);
    (&file)
        .take(HEADER_PREFIX)
        .read_to_end(&mut head)
        .map_err(io)?;
    kpatch_file::PatchFile::expected_len(&head, len).map_err(|e| Error::BadPatch {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    let mut bytes = head;
    bytes.reserve_exact((len as usize).saturating_sub(bytes.len()));
    // One byte more than announced shows a file that grew while being read.
    (&file)
        .take((len + 1).saturating_sub(bytes.len() as u64))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 != len {
        return Err(Error::BadPatch {
            path: path.to_path_buf(),
            what: format!(
                "the file changed size while being read ({len} bytes, then {}): read it \
                 again once it is complete",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

/// Loads every patch at `path`: a file, a directory of `<buildid>.kpatch`, or LibCare
/// storage (for each build-id the level `latest` points to, else the highest level).
pub fn load_patches(path: &Path) -> Result<Vec<Patch>, Error> {
    load_patches_by(path, DirLookup::Native).map(|l| l.patches)
}

/// How a patch directory is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirLookup {
    /// livecare: every `*.kpatch` file (identical copies once) and, in each
    /// `<buildid>/` storage directory, the level `latest` names (else the highest).
    Native,
    /// LibCare's lookup: per build-id, `<buildid>/latest/kpatch.bin`, else
    /// `<buildid>.kpatch`; nothing else in the directory is read.
    LibCare,
}

/// Patches loaded from a path, and what was left out of a directory and why.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The patches to apply, in directory order.
    pub patches: Vec<Patch>,
    /// One line per file left out (a duplicate, or a name LibCare's lookup skips).
    pub notes: Vec<String>,
}

/// Loads the patches at `path`, reading a directory as `lookup` says.
pub fn load_patches_by(path: &Path, lookup: DirLookup) -> Result<Loaded, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        err: e,
    })?;
    if meta.is_file() {
        return Ok(Loaded {
            patches: vec![read_patch_file(path)?],
            notes: Vec::new(),
        });
    }
    if !meta.is_dir() {
        // Never opened: reading a FIFO would block until someone writes to it.
        return Err(Error::BadPatch {
            path: path.to_path_buf(),
            what: format!(
                "not a regular file or a directory ({}); give a .kpatch file or a patch directory",
                file_kind(&meta)
            ),
        });
    }
    let rd = std::fs::read_dir(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        err: e,
    })?;
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    let name_of = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut out = Loaded::default();
    // Storage directories first: LibCare looks up `<buildid>/latest/kpatch.bin` before
    // `<buildid>.kpatch`.
    for p in &entries {
        let name = name_of(p);
        if p.is_dir() && is_hex_id(name.as_bytes()) {
            if let Some(patch) = load_storage_entry(p, lookup)? {
                out.patches.push(patch);
            }
        }
    }
    for p in &entries {
        let name = name_of(p);
        let Some(stem) = name.strip_suffix(".kpatch").filter(|_| p.is_file()) else {
            continue;
        };
        if lookup == DirLookup::LibCare {
            // LibCare opens `<buildid>.kpatch` for each object's build-id; a file named
            // otherwise (the suites' `TEST.kpatch` copy) is never read.
            if !(is_hex_id(stem.as_bytes()) && stem.bytes().all(|c| c.is_ascii_hexdigit())) {
                out.notes.push(format!(
                    "{} ignored: LibCare looks patches up as <buildid>.kpatch",
                    p.display()
                ));
                continue;
            }
            let stem = stem.to_ascii_lowercase();
            if out.patches.iter().any(|q| q.build_id == stem) {
                out.notes.push(format!(
                    "{} ignored: {stem}/latest/kpatch.bin comes first",
                    p.display()
                ));
                continue;
            }
            let patch = read_patch_file(p)?;
            if patch.build_id != stem {
                return Err(Error::BadPatch {
                    path: p.clone(),
                    what: format!(
                        "named for build-id {stem} but made for build-id {}; rename it \
                         <buildid>.kpatch after the object it patches",
                        patch.build_id
                    ),
                });
            }
            out.patches.push(patch);
            continue;
        }
        let patch = read_patch_file(p)?;
        // The same patch under two names (LibCare's suites keep `TEST.kpatch` and
        // `<buildid>.kpatch`): applied once.
        if let Some(first) = out
            .patches
            .iter()
            .find(|q| q.build_id == patch.build_id && q.hash == patch.hash)
        {
            out.notes.push(format!(
                "{} holds the same patch as {}: applied once",
                p.display(),
                first.source.display()
            ));
            continue;
        }
        out.patches.push(patch);
    }
    Ok(out)
}

/// What kind of file `meta` describes, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// `<buildid>/` in LibCare storage: the level `latest` points to (LibCare's lookup),
/// else, natively, the highest numbered level.
fn load_storage_entry(dir: &Path, lookup: DirLookup) -> Result<Option<Patch>, Error> {
    let mut best: Option<(u32, PathBuf)> = None;
    let latest = dir.join("latest").join("kpatch.bin");
    if latest.is_file() {
        let level = std::fs::read_link(dir.join("latest"))
            .ok()
            .and_then(|t| {
                t.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0);
        best = Some((level, latest));
    } else if lookup == DirLookup::Native {
        let rd = std::fs::read_dir(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            err: e,
        })?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(level) = name.parse::<u32>() {
                let f = e.path().join("kpatch.bin");
                if f.is_file() && best.as_ref().is_none_or(|(l, _)| level > *l) {
                    best = Some((level, f));
                }
            }
        }
    }
    let Some((level, f)) = best else {
        return Ok(None);
    };
    let mut p = read_patch_file(&f)?;
    p.level = level;
    if p.patch_id.is_empty() {
        p.patch_id = format!("level-{level}");
    }
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_short_and_unmagic_input() {
        assert!(parse_container(b"KPATCH1\0", Path::new("x")).is_err());
        assert!(parse_container(&[0u8; 1024], Path::new("x")).is_err());
        let mut lp = vec![0u8; 1024];
        lp[..8].copy_from_slice(b"KPATCH1\0");
        lp[88..128].copy_from_slice(&[b'a'; 40]);
        lp[152..156].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let e = parse_container(&lp, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kpatch_offset"), "{e}");
    }
}
