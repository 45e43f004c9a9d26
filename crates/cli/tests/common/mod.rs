//! Helpers shared by the apply tests: run the `livecare` binary, start fixtures,
//! and build patches from two C files with the pipeline of system.md §1.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// The livecare binary under test.
pub fn livecare() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livecare"))
}

/// Runs livecare with `args`; returns the output whatever the status.
pub fn lc(args: &[&str]) -> Output {
    Command::new(livecare())
        .args(args)
        .output()
        .expect("spawning livecare")
}

/// Runs livecare under another name (multi-call), e.g. `libcare-ctl`.
pub fn lc_as(dir: &Path, name: &str, args: &[&str]) -> Result<Output> {
    let link = dir.join(name);
    if !link.exists() {
        std::os::unix::fs::symlink(livecare(), &link)?;
    }
    Ok(Command::new(&link).args(args).output()?)
}

/// stdout of an output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr of an output, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless `o` exited 0, showing both streams.
pub fn ok(o: &Output) -> Result<String> {
    if !o.status.success() {
        bail!(
            "livecare failed ({}):\nstdout:\n{}\nstderr:\n{}",
            o.status,
            stdout(o),
            stderr(o)
        );
    }
    Ok(stdout(o))
}

/// The load address of the first mapping of `path` in `pid`.
pub fn map_base(pid: u32, path: &Path) -> Result<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let p = path.canonicalize()?;
    let p = p.to_string_lossy();
    let line = maps
        .lines()
        .find(|l| l.ends_with(&*p))
        .with_context(|| format!("{p} not mapped"))?;
    let start = line.split('-').next().unwrap_or("0");
    Ok(u64::from_str_radix(start, 16)?)
}

/// Builds a patch from `orig.c` → `patched.c` (both in `dir`) with the assembly
/// pipeline of system.md §1 using livecare's own tools. Returns (original binary,
/// patch path). `flags` are extra gcc flags (e.g. `-O2`, `-no-pie`).
pub fn build_patch(
    dir: &Path,
    orig: &str,
    patched: &str,
    flags: &[&str],
    id: &str,
) -> Result<(PathBuf, PathBuf)> {
    let run = |cmd: &mut Command| -> Result<()> {
        let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
        if !o.status.success() {
            bail!(
                "{cmd:?} failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    };
    let o_s = dir.join("orig.s");
    let p_s = dir.join("patched.s");
    run(Command::new("gcc")
        .args(flags)
        .arg("-S")
        .arg(dir.join(orig))
        .arg("-o")
        .arg(&o_s))?;
    run(Command::new("gcc")
        .args(flags)
        .arg("-S")
        .arg(dir.join(patched))
        .arg("-o")
        .arg(&p_s))?;
    // The patched assembly must name the original source file.
    let ptext = std::fs::read_to_string(&p_s)?.replace(patched, orig);
    std::fs::write(&p_s, ptext)?;
    let bin = dir.join("orig.bin");
    run(Command::new("gcc")
        .args(flags)
        .arg(&o_s)
        .arg("-o")
        .arg(&bin))?;
    let a_s = dir.join("aug.s");
    run(Command::new(livecare())
        .args(["gensrc", "--force-global", "--force-gotpcrel", "-i"])
        .arg(&o_s)
        .arg("-i")
        .arg(&p_s)
        .arg("-o")
        .arg(&a_s))?;
    let pbin = dir.join("patched.bin");
    run(Command::new("gcc")
        .args(flags)
        .arg(&a_s)
        .arg("-Wl,-q")
        .arg("-o")
        .arg(&pbin))?;
    let stripped = dir.join("stripped.o");
    run(Command::new(livecare())
        .args(["strip", "--strip"])
        .arg(&pbin)
        .arg(&stripped))?;
    run(Command::new(livecare())
        .args(["strip", "--rel-fixup"])
        .arg(&bin)
        .arg(&stripped))?;
    run(Command::new("strip").arg("--strip-unneeded").arg(&stripped))?;
    run(Command::new(livecare())
        .args(["strip", "--undo-link"])
        .arg(&bin)
        .arg(&stripped))?;
    let bid = testkit::build_id_of(&bin)?;
    let out = dir.join(format!("{bid}.kpatch"));
    run(Command::new(livecare())
        .args(["make", "-b", &bid, "-i", id, "-o"])
        .arg(&out)
        .arg(&stripped))?;
    Ok((bin, out))
}
