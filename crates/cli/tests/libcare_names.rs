//! LibCare drop-in behaviours under the LibCare tool names (issue 18, items 6, 7, 8, 10
//! and 13), each on a real gcc-built process: patch directories holding the same patch
//! twice, `latest` and level upgrades in patch storage, `kpatch_gensrc --test-mode`,
//! `libcare-cc`'s `--force-gotpcrel` default, and `libcare-ctl unpatch` removing every
//! patch. Each test checks the output change, that unpatch restores it, and that the
//! target is left running, untraced.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use testkit::patchbuild::{Builder, Flags, Patch};
use testkit::{fixture_dir, Running, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");
/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// A scratch directory with every LibCare tool name linked in `bin/`.
fn tools() -> Result<(Scratch, PathBuf)> {
    let s = Scratch::new()?;
    let bin = s.join("bin");
    let out = Command::new(LIVECARE)
        .arg("install-links")
        .arg(&bin)
        .output()?;
    ensure!(out.status.success(), "install-links: {out:?}");
    Ok((s, bin))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `exe args` and requires exit 0; returns stdout and stderr.
fn ok(exe: &Path, args: &[&str]) -> Result<String> {
    let o = Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    ensure!(
        o.status.success(),
        "{} {args:?}: {}",
        exe.display(),
        text(&o)
    );
    Ok(text(&o))
}

fn ps(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The process is alive, not stopped and not traced.
fn assert_clean(p: &mut Running) -> Result<()> {
    ensure!(p.is_alive(), "target died");
    let (state, tracer) = p.proc_state()?;
    ensure!(
        tracer == 0 && !state.starts_with('t') && !state.starts_with('T'),
        "target left {state}, TracerPid {tracer}"
    );
    Ok(())
}

/// Waits until the target prints `want` (after what it printed so far).
fn see(p: &mut Running, want: &str) -> Result<()> {
    p.drain();
    p.wait_for(want, WAIT).map(|_| ())
}

/// How many patches `livecare info` lists for `pid`.
fn applied(pid: u32) -> Result<usize> {
    let o = Command::new(LIVECARE)
        .args(["info", "-p", &pid.to_string(), "--json"])
        .output()?;
    ensure!(o.status.success(), "livecare info: {}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let objects = doc[0]["objects"].as_array().cloned().unwrap_or_default();
    Ok(objects
        .iter()
        .map(|o| o["patches"].as_array().map_or(0, |p| p.len()))
        .sum())
}

fn scenario_builder(s: &Scratch) -> Result<Builder> {
    Builder::new(
        Path::new(LIVECARE),
        &fixture_dir("scenario-exe"),
        &s.join("build"),
        Flags::default(),
    )
}

/// Item 6: LibCare's test `build/` holds the same patch as `TEST.kpatch` and
/// `<buildid>.kpatch`. `libcare-ctl` reads only `<buildid>.kpatch` (a directory with
/// only `TEST.kpatch` has nothing for it); `livecare` applies identical copies once
/// and says so.
#[test]
fn a_directory_holding_two_copies_applies_once() -> Result<()> {
    let (s, bin) = tools()?;
    let b = scenario_builder(&s)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let dir = s.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&patch.path, dir.join("TEST.kpatch"))?;
    std::fs::copy(&patch.path, dir.join(format!("{}.kpatch", exe.build_id)))?;
    let ctl = bin.join("libcare-ctl");

    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let pid = p.pid().to_string();
    ok(&ctl, &["patch", "-p", &pid, ps(&dir)])?;
    see(&mut p, "t0 value=2")?;
    ensure!(applied(p.pid())? == 1, "one patch applied");
    ok(&ctl, &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)?;

    let out = ok(Path::new(LIVECARE), &["patch", "-p", &pid, ps(&dir)])?;
    ensure!(out.contains("applied once"), "says so: {out}");
    see(&mut p, "t0 value=2")?;
    ensure!(applied(p.pid())? == 1, "one patch applied");
    ok(Path::new(LIVECARE), &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)?;

    // Under LibCare's name, a file not named after a build-id is never read.
    std::fs::remove_file(dir.join(format!("{}.kpatch", exe.build_id)))?;
    let o = Command::new(&ctl)
        .args(["patch", "-p", &pid, ps(&dir)])
        .output()?;
    ensure!(!o.status.success(), "nothing to apply: {}", text(&o));
    ensure!(applied(p.pid())? == 0, "nothing applied");
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

/// LibCare storage `<buildid>/<level>/kpatch.bin`, with `latest` pointing at `level`.
fn store(root: &Path, patch: &Patch, level: u32) -> Result<()> {
    let dir = root.join(&patch.build_id).join(level.to_string());
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&patch.path, dir.join("kpatch.bin"))?;
    Ok(())
}

fn set_latest(root: &Path, build_id: &str, level: u32) -> Result<()> {
    let latest = root.join(build_id).join("latest");
    let _ = std::fs::remove_file(&latest);
    std::os::unix::fs::symlink(level.to_string(), &latest)?;
    Ok(())
}

/// Item 7, as LibCare's `patchlevel` test does it: storage holds levels 1 and 2, and
/// `latest` names 1, then 2. The first patch applies level 1 (not the highest number),
/// the second upgrades the running process from 1 to 2, and unpatch restores it.
#[test]
fn latest_symlink_chooses_the_level_and_upgrades_one_to_two() -> Result<()> {
    let (s, bin) = tools()?;
    let b = scenario_builder(&s)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    // One patch id for both levels, as LibcarePlus' test Makefiles give (`-i`).
    let level1 = b.patch(&exe, "patched-basic.c", "0001")?;
    let level2 = b.patch(&exe, "patched-stack2.c", "0001")?;
    let root = s.join("patchlevel-root");
    store(&root, &level1, 1)?;
    store(&root, &level2, 2)?;
    set_latest(&root, &exe.build_id, 1)?;
    let ctl = bin.join("libcare-ctl");

    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let pid = p.pid().to_string();
    ok(&ctl, &["patch-user", "-p", &pid, ps(&root)])?;
    see(&mut p, "t0 value=2")?;
    set_latest(&root, &exe.build_id, 2)?;
    ok(&ctl, &["patch-user", "-p", &pid, ps(&root)])?;
    see(&mut p, "t0 value=3")?;
    ensure!(applied(p.pid())? == 1, "level 2 replaced level 1");
    // Again at the same level: nothing to do, as LibCare says (exit 0).
    let again = ok(&ctl, &["patch-user", "-p", &pid, ps(&root)])?;
    ensure!(again.contains("No patch(es) applicable"), "{again}");
    ensure!(applied(p.pid())? == 1, "still one patch");
    see(&mut p, "t0 value=3")?;
    ok(&ctl, &["unpatch-user", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)?;

    // livecare itself follows `latest` too.
    set_latest(&root, &exe.build_id, 1)?;
    ok(Path::new(LIVECARE), &["patch", "-p", &pid, ps(&root)])?;
    see(&mut p, "t0 value=2")?;
    ok(Path::new(LIVECARE), &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

/// Item 8: LibcarePlus' test Makefiles call `kpatch_gensrc --test-mode` in both the
/// filter and the diff step; the patch made that way applies and unpatches.
#[test]
fn kpatch_gensrc_accepts_test_mode() -> Result<()> {
    let (s, bin) = tools()?;
    let gensrc = bin.join("kpatch_gensrc");
    let b = scenario_builder(&s)?.gensrc_via(&gensrc, &["--os=rhel6", "--test-mode"]);
    let exe = b.executable("orig.c", "prog", &[])?;
    let filtered = s.join("filtered.s");
    ok(
        &gensrc,
        &[
            "--dbg-filter",
            "--test-mode",
            "--os=rhel6",
            "-i",
            ps(&exe.asm),
            "-o",
            ps(&filtered),
        ],
    )?;
    ensure!(std::fs::metadata(&filtered)?.len() > 0, "filter output");
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let ctl = bin.join("libcare-ctl");
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let pid = p.pid().to_string();
    ok(&ctl, &["patch", "-p", &pid, ps(&patch.path)])?;
    see(&mut p, "t0 value=2")?;
    ok(&ctl, &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

/// Item 10: `libcare-patch-make` (through `libcare-cc`) with no KPCC_PATCH_ARGS makes
/// patches that reach glibc's `stdout` through the GOT, as LibCare's `ref_glibc_data`
/// needs: without `--force-gotpcrel` the patch's pc-relative reference to libc's data
/// overflows 32 bits and the apply fails. Both a PIE and a non-PIE program.
#[test]
fn libcare_cc_defaults_to_force_gotpcrel() -> Result<()> {
    let (tree, bin) = tools()?;
    tree.copy_fixture("libcare-gotpcrel")?;
    let o = Command::new(bin.join("libcare-patch-make"))
        .args(["-s", ps(tree.path()), "-i", "0001", "fix.diff"])
        .current_dir(tree.path())
        .env_remove("KPCC_PATCH_ARGS")
        .output()?;
    ensure!(o.status.success(), "libcare-patch-make: {}", text(&o));
    let ctl = bin.join("libcare-ctl");
    let patchroot = tree.join("patchroot");
    for (prog, other) in [("pie", "nopie"), ("nopie", "pie")] {
        let mut p = Running::start(&tree.join(prog), &[])?;
        see(&mut p, "Hello from UNPATCHED")?;
        let pid = p.pid().to_string();
        // The other program's patch is for none of its objects: as LibCare, nothing to
        // do and exit status 0.
        let theirs = patchroot.join(format!(
            "{}.kpatch",
            testkit::build_id_of(&tree.join(other))?
        ));
        let none = ok(&ctl, &["patch", "-p", &pid, ps(&theirs)])?;
        ensure!(none.contains("No patch(es) applicable"), "{none}");
        ok(&ctl, &["patch", "-p", &pid, ps(&patchroot)])?;
        see(&mut p, "Hello from PATCHED")?;
        ok(&ctl, &["unpatch", "-p", &pid])?;
        see(&mut p, "Hello from UNPATCHED")?;
        assert_clean(&mut p)?;
    }
    Ok(())
}

/// Item 13: `libcare-ctl unpatch -p PID` removes every patch of the process (LibCare
/// keeps one per object and removes it whole); `livecare unpatch -p PID` keeps its
/// documented behaviour and removes the newest only.
#[test]
fn libcare_ctl_unpatch_removes_every_patch() -> Result<()> {
    let (s, bin) = tools()?;
    let b = scenario_builder(&s)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let first = b.patch(&exe, "patched-basic.c", "0001")?;
    let second = b.patch(&exe, "patched-stack2.c", "0002")?;
    let ctl = bin.join("libcare-ctl");
    let mut p = Running::start(&exe.path, &[])?;
    see(&mut p, "t0 value=1")?;
    let pid = p.pid().to_string();
    for (patch, want) in [(&first, "t0 value=2"), (&second, "t0 value=3")] {
        ok(&ctl, &["patch", "-p", &pid, ps(&patch.path)])?;
        see(&mut p, want)?;
    }
    ensure!(applied(p.pid())? == 2, "two patches applied");
    let out = ok(&ctl, &["unpatch", "-p", &pid])?;
    ensure!(
        out.matches("successfully cancelled").count() == 2,
        "both reported: {out}"
    );
    see(&mut p, "t0 value=1")?;
    ensure!(applied(p.pid())? == 0, "nothing left applied");
    assert_clean(&mut p)?;

    // The native name removes the newest only.
    for patch in [&first, &second] {
        ok(Path::new(LIVECARE), &["patch", "-p", &pid, ps(&patch.path)])?;
    }
    see(&mut p, "t0 value=3")?;
    ok(Path::new(LIVECARE), &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=2")?;
    ok(&ctl, &["unpatch", "-p", &pid])?;
    see(&mut p, "t0 value=1")?;
    assert_clean(&mut p)
}

/// Item 10, `libcare-cc` called on its own (as LibCare's test Makefiles do in the
/// lpmake flavour) with no KPCC_PATCH_ARGS: the patched-stage object reaches glibc's
/// `stdout` through the GOT, not with a 32-bit pc-relative reference; with
/// KPCC_PATCH_ARGS set (even empty) the options are the ones given, as in LibCare.
#[test]
fn libcare_cc_alone_reaches_glibc_data_through_the_got() -> Result<()> {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};
    let (tree, bin) = tools()?;
    tree.copy_fixture("libcare-gotpcrel")?;
    let cc = |stage: &str, patch_args: Option<&str>| -> Result<Vec<u8>> {
        let mut c = Command::new(bin.join("libcare-cc"));
        c.args(["-O2", "-fPIE", "-c", "pie.c", "-o", "pie.o"])
            .current_dir(tree.path())
            .env("KPATCH_STAGE", stage)
            .env("KPATCH_ASM_DIR", tree.join("asm"))
            .env_remove("KPCCREAL")
            .env_remove("KPCC_PATCH_ARGS");
        if let Some(a) = patch_args {
            c.env("KPCC_PATCH_ARGS", a);
        }
        let o = c.output()?;
        ensure!(o.status.success(), "libcare-cc ({stage}): {}", text(&o));
        Ok(std::fs::read(tree.join("pie.o"))?)
    };
    cc("original", None)?;
    let fix = testkit::fixture_dir("libcare-gotpcrel").join("fix.diff");
    let o = Command::new("patch")
        .args(["-p1", "--quiet", "-i"])
        .arg(&fix)
        .current_dir(tree.path())
        .output()?;
    ensure!(o.status.success(), "patch: {}", text(&o));
    // The kinds of the relocations from the patch code to `stdout`.
    let kinds = |obj: &[u8]| -> Result<Vec<u32>> {
        let f = object::File::parse(obj)?;
        let mut v = Vec::new();
        for sec in f.sections() {
            for (_, r) in sec.relocations() {
                let RelocationTarget::Symbol(i) = r.target() else {
                    continue;
                };
                if f.symbol_by_index(i)?.name()? == "stdout" {
                    if let object::RelocationFlags::Elf { r_type } = r.flags() {
                        v.push(r_type);
                    }
                }
            }
        }
        Ok(v)
    };
    let got = [
        object::elf::R_X86_64_GOTPCREL,
        object::elf::R_X86_64_GOTPCRELX,
        object::elf::R_X86_64_REX_GOTPCRELX,
    ];
    let default = kinds(&cc("patched", None)?)?;
    ensure!(
        !default.is_empty() && default.iter().all(|t| got.contains(t)),
        "stdout through the GOT by default: {default:?}"
    );
    let given = kinds(&cc("patched", Some(""))?)?;
    ensure!(
        given.contains(&object::elf::R_X86_64_PC32),
        "KPCC_PATCH_ARGS=\"\" gives no diff options: {given:?}"
    );
    Ok(())
}
