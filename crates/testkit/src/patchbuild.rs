//! Test-side patch builder: compiles a fixture's original C sources the LibCare way
//! (`gcc -S`, keep the `.s`, `gcc -c` on it, link) and builds a `.kpatch` for a patched
//! variant through the manual pipeline of system.md §1, driving the `livecare` binary:
//! `gensrc`, `gcc -c`, link with `-Wl,-q`, `strip --strip`, `strip --strip-unneeded`,
//! `strip --rel-fixup`, `strip --undo-link`, `make`.
//!
//! The caller chooses the fixture sources, the flags and the path of the `livecare`
//! binary (`env!("CARGO_BIN_EXE_livecare")` in a cli integration test). Every failing
//! step reports the command it ran and that command's output.
//!
//! The patched source is compiled under the original's file name (in its own
//! directory), so the `.file` directive of both assemblies agrees, as the LibCare build
//! arranges with `patch -p1` on the source tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build_id_of, run_ok, Link};

/// Compile and link flags shared by the original and the patched build.
#[derive(Debug, Clone)]
pub struct Flags {
    /// Executables: [`Link::Pie`] or [`Link::NoPie`]. Libraries are always `-fPIC -shared`.
    pub exe_link: Link,
    /// Optimisation flag, for example `-O2`.
    pub opt: String,
    /// More flags, passed to every compile and link step.
    pub extra: Vec<String>,
    /// Pass `--force-gotpcrel` to `gensrc` (always done for libraries).
    pub force_gotpcrel: bool,
}

impl Default for Flags {
    fn default() -> Flags {
        Flags {
            exe_link: Link::Pie,
            opt: "-O2".to_string(),
            extra: Vec::new(),
            force_gotpcrel: false,
        }
    }
}

/// An original object the test runs: an executable or a shared library.
#[derive(Debug, Clone)]
pub struct Object {
    /// The linked file.
    pub path: PathBuf,
    /// Its GNU build-id (lowercase hex).
    pub build_id: String,
    /// The kept assembly the object was built from.
    pub asm: PathBuf,
    /// Source file name inside the fixture (for example `orig.c`).
    source: String,
    /// True for a shared library.
    shared: bool,
    /// Link arguments after the object file (libraries, rpath, soname).
    link_args: Vec<String>,
}

/// A patch built for an [`Object`].
#[derive(Debug, Clone)]
pub struct Patch {
    /// The `.kpatch` container.
    pub path: PathBuf,
    /// The relocatable patch ELF inside it (input of `livecare make`).
    pub elf: PathBuf,
    /// Build-id written into the header.
    pub build_id: String,
    /// Patch id written into the header.
    pub patch_id: String,
}

/// Builds originals and patches of one fixture directory into a work directory.
#[derive(Debug, Clone)]
pub struct Builder {
    livecare: PathBuf,
    fixture: PathBuf,
    work: PathBuf,
    flags: Flags,
    /// Runs the diff step as this tool (e.g. a `kpatch_gensrc` link) with these extra
    /// flags, instead of `livecare gensrc`.
    gensrc_tool: Option<(PathBuf, Vec<String>)>,
}

/// Runs `cmd` (in `cwd` if given) and returns its stdout; errors name the step.
fn step(what: &str, cmd: &mut Command) -> Result<Vec<u8>> {
    let out = run_ok(cmd).with_context(|| format!("patch build step `{what}`"))?;
    Ok(out.stdout)
}

fn stem_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

impl Builder {
    /// A builder for `fixture` (a directory of C sources) writing below `work`.
    pub fn new(livecare: &Path, fixture: &Path, work: &Path, flags: Flags) -> Result<Builder> {
        if !livecare.is_file() {
            bail!("livecare binary {} does not exist", livecare.display());
        }
        if !fixture.is_dir() {
            bail!("fixture directory {} does not exist", fixture.display());
        }
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        Ok(Builder {
            livecare: livecare.to_path_buf(),
            fixture: fixture.to_path_buf(),
            work: work.to_path_buf(),
            flags,
            gensrc_tool: None,
        })
    }

    /// Makes [`Builder::patch`] run its diff step as `tool` (a LibCare tool name linked
    /// to livecare, say `kpatch_gensrc`) with `extra` flags first.
    pub fn gensrc_via(mut self, tool: &Path, extra: &[&str]) -> Builder {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        self.gensrc_tool = Some((tool.to_path_buf(), extra));
        self
    }

    /// The flags in use.
    pub fn flags(&self) -> &Flags {
        &self.flags
    }

    /// Code-generation flags for `gcc -S`.
    fn compile_flags(&self, shared: bool) -> Vec<String> {
        let mut v = vec![self.flags.opt.clone(), "-pthread".to_string()];
        v.push(
            match (shared, self.flags.exe_link) {
                (true, _) => "-fPIC",
                (false, Link::NoPie) => "-fno-pie",
                _ => "-fPIE",
            }
            .to_string(),
        );
        v.extend(self.flags.extra.iter().cloned());
        v
    }

    /// Link mode flags.
    fn link_flags(&self, shared: bool) -> Vec<String> {
        let mut v: Vec<String> = match (shared, self.flags.exe_link) {
            (true, _) => vec!["-shared".into()],
            (false, Link::NoPie) => vec!["-no-pie".into()],
            _ => vec!["-pie".into()],
        };
        v.push("-pthread".into());
        v.extend(self.flags.extra.iter().cloned());
        v
    }

    /// Copies fixture source `src` (or, for a `.diff`, `base` patched by it) into
    /// `dir` under the name `as_name`, and compiles it there with `gcc -S`.
    fn compile_asm(&self, dir: &Path, src: &str, as_name: &str, shared: bool) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let dest = dir.join(as_name);
        if src.ends_with(".diff") || src.ends_with(".patch") {
            std::fs::copy(self.fixture.join(as_name), &dest)
                .with_context(|| format!("copying {as_name} from the fixture"))?;
            step(
                "patch",
                Command::new("patch")
                    .current_dir(dir)
                    .args(["--quiet", "--no-backup-if-mismatch", "-i"])
                    .arg(self.fixture.join(src))
                    .arg(as_name),
            )?;
        } else {
            std::fs::copy(self.fixture.join(src), &dest)
                .with_context(|| format!("copying {src} from {}", self.fixture.display()))?;
        }
        // Headers next to the sources stay reachable through -I.
        let asm = dir.join(format!("{}.s", stem_of(as_name)));
        step(
            "gcc -S",
            Command::new("gcc")
                .current_dir(dir)
                .args(self.compile_flags(shared))
                .arg("-I")
                .arg(&self.fixture)
                .args(["-S", as_name, "-o"])
                .arg(&asm),
        )?;
        Ok(asm)
    }

    /// Assembles `asm` and links it into `out` with `link_args`, plus `-Wl,-q` if `keep_relocs`.
    fn assemble_link(
        &self,
        asm: &Path,
        out: &Path,
        shared: bool,
        link_args: &[String],
        keep_relocs: bool,
    ) -> Result<()> {
        let obj = asm.with_extension("o");
        step(
            "gcc -c",
            Command::new("gcc")
                .args(self.compile_flags(shared))
                .arg("-c")
                .arg(asm)
                .arg("-o")
                .arg(&obj),
        )?;
        let mut link = Command::new("gcc");
        link.args(self.link_flags(shared));
        if keep_relocs {
            link.arg("-Wl,-q");
        }
        link.arg(&obj).args(link_args).arg("-o").arg(out);
        step(if keep_relocs { "link -Wl,-q" } else { "link" }, &mut link)?;
        Ok(())
    }

    /// Builds shared library `lib<name>.so` from fixture source `src`.
    pub fn library(&self, src: &str, name: &str) -> Result<Object> {
        let dir = self.work.join(format!("lib{name}-orig"));
        let asm = self.compile_asm(&dir, src, src, true)?;
        let file = format!("lib{name}.so");
        let out = self.work.join(&file);
        let link_args = vec![format!("-Wl,-soname,{file}")];
        self.assemble_link(&asm, &out, true, &link_args, false)
            .with_context(|| format!("building original library {file}"))?;
        Ok(Object {
            build_id: build_id_of(&out)?,
            path: out,
            asm,
            source: src.to_string(),
            shared: true,
            link_args,
        })
    }

    /// Builds executable `name` from fixture source `src`, linked against `libs`
    /// (found at run time through an rpath).
    pub fn executable(&self, src: &str, name: &str, libs: &[&Object]) -> Result<Object> {
        let dir = self.work.join(format!("{name}-orig"));
        let asm = self.compile_asm(&dir, src, src, false)?;
        let out = self.work.join(name);
        let mut link_args = Vec::new();
        for lib in libs {
            let parent = lib.path.parent().context("library without a directory")?;
            link_args.push(lib.path.display().to_string());
            link_args.push(format!("-Wl,-rpath,{}", parent.display()));
        }
        self.assemble_link(&asm, &out, false, &link_args, false)
            .with_context(|| format!("building original executable {name}"))?;
        Ok(Object {
            build_id: build_id_of(&out)?,
            path: out,
            asm,
            source: src.to_string(),
            shared: false,
            link_args,
        })
    }

    /// Builds a patch for `orig` from fixture source `patched` (a full C file or a
    /// `.diff` against the original source), with patch id `patch_id`.
    pub fn patch(&self, orig: &Object, patched: &str, patch_id: &str) -> Result<Patch> {
        let tag = format!(
            "{}-{}-{patch_id}",
            orig.path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("obj"),
            stem_of(patched)
        );
        let dir = self.work.join(&tag);
        let patched_s = self.compile_asm(&dir, patched, &orig.source, orig.shared)?;
        let lc = |what: &str| {
            let mut c = Command::new(&self.livecare);
            c.arg(what);
            c
        };
        let aug = dir.join("aug.s");
        let mut gensrc = match &self.gensrc_tool {
            Some((tool, extra)) => {
                let mut c = Command::new(tool);
                c.args(extra);
                c
            }
            None => lc("gensrc"),
        };
        if orig.shared || self.flags.force_gotpcrel {
            gensrc.arg("--force-gotpcrel");
        }
        gensrc
            .arg("-i")
            .arg(&orig.asm)
            .arg("-i")
            .arg(&patched_s)
            .arg("-o")
            .arg(&aug);
        step("livecare gensrc", &mut gensrc)?;
        let linked = dir.join("linked");
        self.assemble_link(&aug, &linked, orig.shared, &orig.link_args, true)?;
        let elf = dir.join("patch.elf");
        step(
            "livecare strip --strip",
            lc("strip").arg("--strip").arg(&linked).arg(&elf),
        )?;
        step(
            "strip --strip-unneeded",
            Command::new("strip").arg("--strip-unneeded").arg(&elf),
        )?;
        step(
            "livecare strip --rel-fixup",
            lc("strip").arg("--rel-fixup").arg(&orig.path).arg(&elf),
        )?;
        step(
            "livecare strip --undo-link",
            lc("strip").arg("--undo-link").arg(&orig.path).arg(&elf),
        )?;
        let path = dir.join(format!("{}.kpatch", orig.build_id));
        self.make(&elf, &orig.build_id, patch_id, &path)?;
        Ok(Patch {
            path,
            elf,
            build_id: orig.build_id.clone(),
            patch_id: patch_id.to_string(),
        })
    }

    /// Wraps patch ELF `elf` into container `out` claiming `build_id` (also used to forge).
    pub fn make(&self, elf: &Path, build_id: &str, patch_id: &str, out: &Path) -> Result<()> {
        step(
            "livecare make",
            Command::new(&self.livecare)
                .args(["make", "-b", build_id, "-i", patch_id, "-o"])
                .arg(out)
                .arg(elf),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{livecare_bin, Scratch};

    #[test]
    fn builds_a_patch_that_livecare_inspect_reads() -> Result<()> {
        let livecare = livecare_bin();
        if !livecare.is_file() {
            // The cli tests run the same builder with the freshly built binary.
            eprintln!("skipping: {} not built", livecare.display());
            return Ok(());
        }
        let dir = Scratch::new()?;
        let b = Builder::new(
            &livecare,
            &crate::fixture_dir("scenario-exe"),
            dir.path(),
            Flags::default(),
        )?;
        let exe = b.executable("orig.c", "prog", &[])?;
        let patch = b.patch(&exe, "patched-basic.c", "0001")?;
        assert_eq!(patch.build_id, exe.build_id);
        let out = run_ok(
            Command::new(&livecare)
                .args(["inspect", "--json"])
                .arg(&patch.path),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&exe.build_id), "{text}");
        assert!(text.contains("\"value\""), "hunk for value(): {text}");
        // A missing fixture source is reported with its name.
        let err = b.patch(&exe, "no-such.c", "0002").unwrap_err();
        assert!(format!("{err:#}").contains("no-such.c"), "{err:#}");
        Ok(())
    }
}
