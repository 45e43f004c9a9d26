//! `livecare build` and `libcare-patch-make` on real projects (plain make with a static
//! and a shared library, autotools, CMake): the patches they make apply to running
//! processes built by the same tree, and the processes behave as the fix says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::{build_id_of, Running, Scratch, Seen};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

/// Runs `livecare ARGS` in `dir`; a run longer than two minutes is killed and fails.
fn livecare_in(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_livecare"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "livecare {args:?} hung; output so far:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn kpatch_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kpatch"))
        .collect();
    v.sort();
    v
}

/// Applies every patch in `dir` to `pid`.
fn patch(pid: u32, dir: &Path) {
    ok(
        livecare_in(
            dir,
            &["patch", "-p", &pid.to_string(), &dir.to_string_lossy()],
        ),
        "livecare patch",
    );
}

fn unpatch(pid: u32) {
    ok(
        livecare_in(Path::new("/"), &["unpatch", "-p", &pid.to_string()]),
        "livecare unpatch",
    );
}

/// Asserts that every source file of the fixture is back to its original contents.
fn assert_sources_restored(tree: &Path, case: &str, files: &[&str]) {
    for f in files {
        let want = std::fs::read(testkit::fixture_dir(case).join(f)).unwrap();
        let got = std::fs::read(tree.join(f)).unwrap();
        assert!(want == got, "{f} was not restored");
    }
}

fn n_of(line: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("n="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no n= in {line:?}"))
}

fn calls_of(line: &str) -> i64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("calls="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no calls= in {line:?}"))
}

/// The make fixture's program before and after the patch: a counter in a static library
/// (+2 → +1) and labels from a shared library ("odd-ish"/"even-ish" → "ODD"/"EVEN").
fn check_make_fixture_live(tree: &Path, patches: &Path) {
    let made = kpatch_files(patches);
    let prog_id = build_id_of(&tree.join("prog")).unwrap();
    let lib_id = build_id_of(&tree.join("shared/liblabel.so")).unwrap();
    let names: Vec<String> = made
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&prog_id) && names.contains(&lib_id),
        "{names:?} vs {prog_id} {lib_id}"
    );

    let mut p = Running::start(&tree.join("prog"), &[]).unwrap();
    let before = p.wait_for("label=even-ish", WAIT).unwrap();
    let next = p.wait_for("label=", WAIT).unwrap();
    assert_eq!(n_of(&next) - n_of(&before), 2, "{before} / {next}");
    // Two patches, each committed in its own stop (and, below, taken off by two
    // livecare runs): lines computed between them mix old and new code, and lines
    // printed before livecare exited may arrive after it. So: valid lines of any mix
    // first, then three in a row of the whole new behaviour, and never back.
    patch(p.pid(), patches);
    p.settle(3, WAIT, make_fixture_state(true))
        .unwrap_or_else(|e| panic!("patched behaviour: {e:#}"));
    // Last in, first out: two patches, two unpatches, and the old behaviour returns.
    unpatch(p.pid());
    unpatch(p.pid());
    p.settle(3, WAIT, make_fixture_state(false))
        .unwrap_or_else(|e| panic!("original behaviour after unpatch: {e:#}"));
    assert!(p.is_alive());
}

/// Classifies the make fixture's lines against the state `patched` (or the original):
/// a line shows it when its counter step from the previous line (+1 patched, +2
/// original) and its label (`ODD`/`EVEN` patched, `odd-ish`/`even-ish` original)
/// both do. Any other valid mix is transitional; a label that does not match the
/// parity of `n`, a step other than 1 or 2, or a `calls` step other than 1 is an
/// error (the new label_for() counts in the library's own static `calls`, which the
/// original label_calls() reads).
fn make_fixture_state(patched: bool) -> impl FnMut(&str) -> anyhow::Result<Seen> {
    let mut prev: Option<(i64, i64)> = None;
    move |line: &str| {
        if !line.contains("label=") {
            return Ok(Seen::Ignore);
        }
        let (n, calls) = (n_of(line), calls_of(line));
        let new_label = if n % 2 == 1 {
            "label=ODD"
        } else {
            "label=EVEN"
        };
        let old_label = if n % 2 == 1 {
            "label=odd-ish"
        } else {
            "label=even-ish"
        };
        let label_new = if line.contains(&format!("{new_label} ")) {
            true
        } else if line.contains(&format!("{old_label} ")) {
            false
        } else {
            anyhow::bail!("label does not fit n={n}");
        };
        let Some((pn, pcalls)) = prev.replace((n, calls)) else {
            return Ok(Seen::Ignore);
        };
        anyhow::ensure!(
            calls - pcalls == 1,
            "calls went from {pcalls} to {calls}: the patch code lost the static variable?"
        );
        let step = (n - pn).rem_euclid(1000);
        anyhow::ensure!(step == 1 || step == 2, "n went from {pn} to {n}");
        let counter_new = step == 1;
        Ok(if counter_new == patched && label_new == patched {
            Seen::Final
        } else {
            Seen::Transitional
        })
    }
}

#[test]
fn livecare_build_patches_static_and_shared_library_code_of_a_running_program() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    let out = tree.join("patches");
    let text = ok(
        livecare_in(
            tree.path(),
            &[
                "build", "-C", ".", "-o", "patches", "--clean", "-i", "0001", "fix.diff",
            ],
        ),
        "livecare build",
    );
    assert!(
        text.contains("counter_next") && text.contains("label_for"),
        "{text}"
    );
    assert_eq!(kpatch_files(&out).len(), 2, "{text}");
    assert_sources_restored(
        tree.path(),
        "build-make",
        &["lib/counter.c", "shared/label.c"],
    );
    check_make_fixture_live(tree.path(), &out);
}

#[test]
fn an_output_directory_with_quotes_and_command_substitution_runs_nothing() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    // The wrapper scripts in WORKDIR/bin (and `CC`, which make pastes into shell
    // commands) must keep this a path: a `'` ends an unescaped quote, and the `$(…)`
    // would run.
    let marker = tree.join("ran");
    let outdir = tree.join(format!("out 'x' $(touch {})", marker.display()));
    let work = Scratch::new().unwrap();
    let workdir = work.join(format!("work 'x' $(touch {})", marker.display()));
    let text = ok(
        livecare_in(
            tree.path(),
            &[
                "build",
                "-o",
                outdir.to_str().unwrap(),
                "--workdir",
                workdir.to_str().unwrap(),
                "--clean",
                "fix.diff",
            ],
        ),
        "livecare build",
    );
    assert!(
        !marker.exists(),
        "the output directory's name was run:\n{text}"
    );
    assert_eq!(kpatch_files(&outdir).len(), 2, "{text}");
    let script = std::fs::read_to_string(workdir.join("bin/cc")).unwrap();
    assert!(script.contains("'\\''x'\\''"), "{script}");
    check_make_fixture_live(tree.path(), &outdir);
}

#[test]
fn libcare_patch_make_prints_libcare_banners_and_fills_patchroot() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    let bin = tree.join("tools/libcare-patch-make");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_livecare"), &bin).unwrap();
    let out = Command::new(&bin)
        .args([
            "-s",
            &tree.path().to_string_lossy(),
            "-d",
            "DESTDIR",
            "-i",
            "0001",
            "fix.diff",
        ])
        .current_dir(tree.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = ok(out, "libcare-patch-make");
    let at = |b: &str| {
        stdout
            .find(b)
            .unwrap_or_else(|| panic!("no {b} banner in:\n{text}"))
    };
    assert!(at("BUILDING ORIGINAL CODE") < at("BUILDING PATCHED CODE"));
    assert!(at("BUILDING PATCHED CODE") < at("MAKING PATCHES"));
    let first = kpatch_files(&tree.join("patchroot"));
    assert_eq!(first.len(), 2);
    // -d DESTDIR: as LibCare, the original stage installs into lpmake/, the patched
    // one into .lpmaketmp/patched/.
    for dir in ["lpmake", ".lpmaketmp/patched"] {
        let installed = tree.join(format!("{dir}/usr/bin/prog"));
        assert!(installed.is_file(), "{text}");
    }
    assert_sources_restored(
        tree.path(),
        "build-make",
        &["lib/counter.c", "shared/label.c"],
    );
    // --update rebuilds only the patches, against the originals kept in lpmake/.
    for f in &first {
        std::fs::remove_file(f).unwrap();
    }
    let out = Command::new(&bin)
        .args([
            "-u",
            "-s",
            &tree.path().to_string_lossy(),
            "-i",
            "0001",
            "fix.diff",
        ])
        .current_dir(tree.path())
        .output()
        .unwrap();
    let text = ok(out, "libcare-patch-make -u");
    assert!(!text.contains("BUILDING ORIGINAL CODE"), "{text}");
    assert_eq!(kpatch_files(&tree.join("patchroot")), first);
    check_make_fixture_live(tree.path(), &tree.join("patchroot"));
}

#[test]
fn a_diff_that_does_not_apply_builds_nothing() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    tree.write(
        "bad.diff",
        "--- a/lib/counter.c\n+++ b/lib/counter.c\n@@ -1,1 +1,1 @@\n-no such line\n+x\n",
    )
    .unwrap();
    let out = livecare_in(tree.path(), &["build", "-o", "patches", "bad.diff"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not apply"), "{err}");
    assert!(!tree.join("prog").exists(), "the tree was built");
    assert_sources_restored(tree.path(), "build-make", &["lib/counter.c"]);
}

#[test]
fn a_comment_only_diff_says_why_there_is_no_patch() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    tree.write(
        "comment.diff",
        "--- a/lib/counter.c\n+++ b/lib/counter.c\n@@ -1,3 +1,3 @@\n-/* Static library: a function the patch fixes (off-by-one). */\n+/* Static library: reworded comment. */\n #include \"counter.h\"\n \n",
    )
    .unwrap();
    let out = livecare_in(tree.path(), &["build", "-o", "patches", "comment.diff"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no patch was produced") && err.contains("no function"),
        "{err}"
    );
    assert_sources_restored(tree.path(), "build-make", &["lib/counter.c"]);
}

#[test]
fn autotools_project_patch_applies_to_the_running_program() {
    testkit::needs_tool!("autoreconf", "apt-get install -y autoconf automake");
    testkit::needs_tool!("automake", "apt-get install -y autoconf automake");
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-autotools").unwrap();
    let run = |cmd: &str| {
        let out = Command::new("sh")
            .args(["-c", cmd])
            .current_dir(tree.path())
            .output()
            .unwrap();
        ok(out, cmd);
    };
    run("autoreconf -i >/dev/null 2>&1 && ./configure -q");
    ok(
        livecare_in(tree.path(), &["build", "-o", "patches", "fix.diff"]),
        "livecare build",
    );
    let made = kpatch_files(&tree.join("patches"));
    let id = build_id_of(&tree.join("greeter")).unwrap();
    assert_eq!(made, [tree.join(format!("patches/{id}.kpatch"))]);
    assert_sources_restored(tree.path(), "build-autotools", &["src/words.c"]);
    let mut p = Running::start(&tree.join("greeter"), &[]).unwrap();
    p.wait_for("word=automake", WAIT).unwrap();
    patch(p.pid(), &tree.join("patches"));
    p.wait_for("word=PATCHED", WAIT).unwrap();
    p.wait_for("word=LIVE", WAIT).unwrap();
}

#[test]
fn cmake_project_patch_applies_to_its_shared_library_in_a_running_program() {
    testkit::needs_tool!("cmake", "apt-get install -y cmake");
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-cmake").unwrap();
    let text = ok(
        livecare_in(
            tree.path(),
            &[
                "build",
                "-o",
                "patches",
                "fix.diff",
                "--",
                "sh",
                "-c",
                "cmake -S . -B build >/dev/null && make -C build",
            ],
        ),
        "livecare build",
    );
    let id = build_id_of(&tree.join("build/libshout.so")).unwrap();
    assert_eq!(
        kpatch_files(&tree.join("patches")),
        [tree.join(format!("patches/{id}.kpatch"))],
        "{text}"
    );
    let mut p = Running::start(&tree.join("build/ticker"), &[]).unwrap();
    p.wait_for("quiet cmake", WAIT).unwrap();
    patch(p.pid(), &tree.join("patches"));
    p.wait_for("LOUD cmake!", WAIT).unwrap();
}

#[test]
fn target_names_a_deployed_binary_that_the_original_stage_must_reproduce_exactly() {
    // The deployed binary: a plain `make` of the same tree, copied out of it.
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    testkit::run_ok(Command::new("make").arg("-j2").current_dir(tree.path())).unwrap();
    let deployed = Scratch::new().unwrap();
    let prog = deployed.join("prog");
    std::fs::copy(tree.join("prog"), &prog).unwrap();
    let deployed_id = build_id_of(&prog).unwrap();

    // Same tree, compiler, flags and path: the original stage reproduces it bit for bit
    // and only its patch is made.
    let text = ok(
        livecare_in(
            tree.path(),
            &[
                "build",
                "-C",
                ".",
                "-o",
                "patches",
                "--clean",
                "--target",
                prog.to_str().unwrap(),
                "fix.diff",
            ],
        ),
        "livecare build --target deployed",
    );
    assert!(text.contains("bit-identical"), "{text}");
    let made = kpatch_files(&tree.join("patches"));
    assert_eq!(made.len(), 1, "{text}");
    assert_eq!(
        made[0].file_stem().unwrap().to_string_lossy(),
        deployed_id,
        "{text}"
    );

    // A deployed binary built with other flags: refused, saying so and why. (Its debug
    // info names its sources relatively, so the check of where it was built, made
    // before the build, says nothing and the builds are compared.)
    let other = Scratch::new().unwrap();
    other.copy_fixture("build-make").unwrap();
    testkit::run_ok(
        Command::new("make")
            .arg(format!(
                "CFLAGS=-O0 -g -ffile-prefix-map={}=.",
                other.path().display()
            ))
            .current_dir(other.path()),
    )
    .unwrap();
    let stale = deployed.join("stale").join("prog");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::copy(other.join("prog"), &stale).unwrap();
    let out = livecare_in(
        tree.path(),
        &[
            "build",
            "-C",
            ".",
            "-o",
            "patches2",
            "--clean",
            "--target",
            stale.to_str().unwrap(),
            "fix.diff",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("would not apply") && err.contains(".text size"),
        "{err}"
    );
    // The compile flags each build recorded (DW_AT_producer) are named.
    assert!(
        err.contains("compile flags (DW_AT_producer): deployed only [-O0]"),
        "{err}"
    );
    assert!(err.contains(&build_id_of(&stale).unwrap()), "{err}");
    assert_sources_restored(
        tree.path(),
        "build-make",
        &["lib/counter.c", "shared/label.c"],
    );
}

#[test]
fn a_patch_id_that_does_not_fit_is_refused_before_building() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-make").unwrap();
    let out = livecare_in(
        tree.path(),
        &[
            "build",
            "-C",
            ".",
            "-o",
            "patches",
            "-i",
            "far-too-long",
            "fix.diff",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("far-too-long"), "{err}");
    assert!(!tree.join("prog").exists(), "something was built: {err}");
}

/// One line of the build-same-name fixture: `n=N value=V other=O [fixed]`.
fn same_name_line(line: &str) -> Option<(i64, i64, i64, bool)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))?
            .parse()
            .ok()
    };
    Some((
        field("n=")?,
        field("value=")?,
        field("other=")?,
        line.ends_with(" fixed"),
    ))
}

/// A patched function calling a global function whose name is also static in another
/// file (redis: `dictFind` in dict.c and in hiredis's async.c) must call the global one.
/// The patch took the first symbol of that name, the static one: with equal sizes the
/// applier's checks passed and the patched code silently called the wrong function.
#[test]
fn a_patched_call_to_a_global_function_shadowed_by_a_static_one_elsewhere_calls_the_global() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture("build-same-name").unwrap();
    testkit::run_ok(Command::new("make").current_dir(tree.path())).unwrap();
    let text = ok(
        livecare_in(tree.path(), &["build", "fix.diff"]),
        "livecare build (same-name)",
    );
    let out = tree.join("patches");
    assert_eq!(kpatch_files(&out).len(), 1, "{text}");
    let mut p = Running::start(&tree.join("prog"), &[]).unwrap();
    let right = |fixed: bool| {
        move |l: &str| {
            same_name_line(l)
                .is_some_and(|(n, v, o, f)| v == n + 700 && o == n + 1000 && f == fixed)
        }
    };
    p.wait_for_match(right(false), WAIT).unwrap();
    patch(p.pid(), &out);
    let line = p.wait_for_match(|l| l.ends_with(" fixed"), WAIT).unwrap();
    assert!(
        right(true)(&line),
        "the patched code called the wrong lookup: {line}"
    );
    for _ in 0..5 {
        let line = p.wait_for("n=", WAIT).unwrap();
        assert!(right(true)(&line), "{line}");
    }
    unpatch(p.pid());
    p.wait_for_match(right(false), WAIT).unwrap();
    assert!(p.is_alive());
}
