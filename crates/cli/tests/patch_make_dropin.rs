//! `libcare-patch-make` as a drop-in for LibCare's (issue 18.11), on a project written
//! for LibCare's (fixture `lpmake-dropin`, modelled on LibCare's test Makefiles): with
//! `--clean` the project's `make clean` deletes `lpmake/`; the Makefile builds only
//! under `IS_LIBCARE_CC=y`; its patched stage links against the original library
//! installed into `$LPMAKE_ORIGINAL_DIR`; the patch goes to `$LPMAKE_PATCHROOT`
//! (relative, as the suite gives it); the diff separates its timestamps with spaces.
//! The patch made must change the installed original program live, and unpatch
//! restore it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use testkit::{build_id_of, Running, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

fn run_ok(cmd: &mut Command) -> Result<String> {
    let o = cmd.output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    ensure!(o.status.success(), "{cmd:?}: {:?}\n{text}", o.status);
    Ok(text)
}

#[test]
fn libcare_patch_make_clean_builds_a_libcare_project_into_lpmake_patchroot() -> Result<()> {
    let tree = Scratch::new()?;
    tree.copy_fixture("lpmake-dropin")?;
    let bin = tree.join("tools");
    run_ok(Command::new(LIVECARE).arg("install-links").arg(&bin))?;
    // Left over from an earlier run: --clean must start afresh.
    tree.write("lpmake/stale", "old")?;

    let text = run_ok(
        Command::new(bin.join("libcare-patch-make"))
            .args(["--clean", "fix.diff"])
            .env("LPMAKE_PATCHROOT", "out")
            .current_dir(tree.path()),
    )?;
    ensure!(!tree.join("lpmake/stale").exists(), "not cleaned:\n{text}");
    // The original stage installed into lpmake/ (LPMAKE_ORIGINAL_DIR's default).
    let prog = tree.join("lpmake/prog");
    ensure!(
        prog.is_file() && tree.join("lpmake/libgreet.so").is_file(),
        "originals not installed into lpmake/:\n{text}"
    );
    let patch = tree.join(format!("out/{}.kpatch", build_id_of(&prog)?));
    ensure!(patch.is_file(), "no {} made:\n{text}", patch.display());
    let source = std::fs::read_to_string(tree.join("prog.c"))?;
    ensure!(source.contains("return 1;"), "source left patched");

    let mut cmd = Command::new(&prog);
    cmd.env("LD_LIBRARY_PATH", tree.join("lpmake"));
    let mut p = Running::spawn(cmd)?;
    p.wait_for("value=1 hello", WAIT)?;
    let ctl = bin.join("libcare-ctl");
    let pid = p.pid().to_string();
    run_ok(
        Command::new(&ctl)
            .args(["patch-user", "-p", &pid])
            .arg(tree.join("out")),
    )?;
    p.drain();
    p.wait_for("value=2 hello", WAIT)?;
    run_ok(Command::new(&ctl).args(["unpatch-user", "-p", &pid]))?;
    p.drain();
    p.wait_for("value=1 hello", WAIT)?;
    ensure!(p.is_alive(), "target died");
    let (state, tracer) = p.proc_state()?;
    ensure!(
        tracer == 0 && !state.starts_with('t') && !state.starts_with('T'),
        "target left {state}, TracerPid {tracer}"
    );
    ensure!(Path::new(&format!("/proc/{pid}")).exists());
    Ok(())
}

/// Issue 18.9: under the name `kpatch_make`, a call without `-i` (LibCare's suite
/// calls it so) writes LibCare's header layout, which LibCare's `libcare-ctl` requires;
/// with `-i` (LibcarePlus' suite) LibcarePlus' layout. Both apply and unpatch live.
#[test]
fn kpatch_make_writes_the_layout_its_call_implies() -> Result<()> {
    use testkit::patchbuild::{Builder, Flags};
    let s = Scratch::new()?;
    let bin = s.join("tools");
    run_ok(Command::new(LIVECARE).arg("install-links").arg(&bin))?;
    let b = Builder::new(
        Path::new(LIVECARE),
        &testkit::fixture_dir("scenario-exe"),
        &s.join("build"),
        Flags::default(),
    )?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let make = bin.join("kpatch_make");
    let libcare = s.join("libcare.kpatch");
    let plus = s.join("plus.kpatch");
    run_ok(
        Command::new(&make)
            .args(["-b", &exe.build_id])
            .arg(&patch.elf)
            .arg("-o")
            .arg(&libcare),
    )?;
    run_ok(
        Command::new(&make)
            .args(["-b", &exe.build_id, "-i", "0001"])
            .arg(&patch.elf)
            .arg("-o")
            .arg(&plus),
    )?;
    for (file, layout) in [
        (&libcare, kpatch_file::Layout::LibCare),
        (&plus, kpatch_file::Layout::LibCarePlus),
    ] {
        let bytes = std::fs::read(file)?;
        let parsed = kpatch_file::PatchFile::parse(&bytes)?;
        ensure!(
            parsed.layout() == layout,
            "{}: {:?}",
            file.display(),
            parsed.layout()
        );
    }
    // `livecare make` keeps LibcarePlus' layout as its default.
    let native = s.join("native.kpatch");
    run_ok(
        Command::new(LIVECARE)
            .args(["make", "-b", &exe.build_id])
            .arg(&patch.elf)
            .arg("-o")
            .arg(&native),
    )?;
    let bytes = std::fs::read(&native)?;
    ensure!(kpatch_file::PatchFile::parse(&bytes)?.layout() == kpatch_file::Layout::LibCarePlus);

    let ctl = bin.join("libcare-ctl");
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("t0 value=1", WAIT)?;
    let pid = p.pid().to_string();
    for file in [&libcare, &plus] {
        run_ok(Command::new(&ctl).args(["patch", "-p", &pid]).arg(file))?;
        p.drain();
        p.wait_for("t0 value=2", WAIT)?;
        run_ok(Command::new(&ctl).args(["unpatch", "-p", &pid]))?;
        p.drain();
        p.wait_for("t0 value=1", WAIT)?;
    }
    let (state, tracer) = p.proc_state()?;
    ensure!(
        p.is_alive() && tracer == 0 && !state.starts_with('t') && !state.starts_with('T'),
        "target left {state}, TracerPid {tracer}"
    );
    Ok(())
}
