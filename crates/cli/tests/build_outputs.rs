//! Issue 17 (build side): a default build that also makes a gcov-instrumented
//! program (memcached's `make`) still gives working patches; the summary names
//! functions only; a second, different fix never silently replaces the first patch
//! for the same binary; an already-built tree is named as the cause, with the fix.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{build_id_of, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

const CASE: &str = "build-coverage";

fn livecare() -> &'static str {
    env!("CARGO_BIN_EXE_livecare")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `livecare build -C tree -o out [extra] fix -- make` from another directory.
fn build(tree: &Path, out: &Path, fix: &Path, extra: &[&str]) -> Output {
    Command::new(livecare())
        .current_dir("/")
        .args(["build", "-C"])
        .arg(tree)
        .arg("-o")
        .arg(out)
        .args(extra)
        .arg(fix)
        .args(["--", "make"])
        .output()
        .expect("run livecare build")
}

fn build_ok(tree: &Path, out: &Path, fix: &Path, extra: &[&str]) -> String {
    let o = build(tree, out, fix, extra);
    let t = text(&o);
    assert!(o.status.success(), "livecare build failed:\n{t}");
    t
}

fn fixture_tree() -> Scratch {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture(CASE).unwrap();
    tree
}

/// `value.c` is the fixture's again after a build, whatever its outcome.
fn assert_source_restored(tree: &Path) {
    let want = std::fs::read(testkit::fixture_dir(CASE).join("value.c")).unwrap();
    assert!(
        std::fs::read(tree.join("value.c")).unwrap() == want,
        "value.c was not restored after the build"
    );
}

/// `(n, value)` of a line `tick=N value=V`.
fn tick(line: &str) -> Option<(i64, i64)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse::<i64>().ok())
    };
    Some((field("tick=")?, field("value=")?))
}

fn expect(p: &mut Running, what: &str, pred: impl Fn(i64, i64) -> bool) {
    p.wait_for_match(|l| tick(l).is_some_and(|(n, v)| pred(n, v)), WAIT)
        .unwrap_or_else(|e| panic!("no {what} line: {e:#}"));
    for _ in 0..3 {
        let line = p.wait_for("tick=", WAIT).unwrap();
        let (n, v) = tick(&line).unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(pred(n, v), "expected {what}, got {line:?}");
    }
}

fn run_livecare(args: &[&str]) -> String {
    let o = Command::new(livecare()).args(args).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "livecare {args:?} failed:\n{t}");
    t
}

/// Patches a running `prog` with the patches in `out`: the output changes, the
/// process is left untraced, and unpatch brings the original behaviour back.
fn check_live(prog: &Path, out: &Path) {
    let mut p = Running::start(prog, &[]).unwrap();
    let pid = p.pid().to_string();
    let original = |n: i64, v: i64| v == 2 * n + 1;
    expect(&mut p, "original", original);
    let dir = out.to_string_lossy();
    let said = run_livecare(&["patch", "-p", &pid, &dir]);
    expect(&mut p, "patched", |n, v| v == -(3 * n));
    let (state, tracer) = p.proc_state().unwrap();
    assert_eq!(tracer, 0, "left traced ({state}); patch said:\n{said}");
    run_livecare(&["unpatch", "-p", &pid]);
    expect(&mut p, "original again", original);
    assert!(p.is_alive());
}

/// memcached's case (issue 17.2): the default `make` also builds an instrumented
/// `prog-debug` whose coverage records and counter arrays change with the fix. The
/// build succeeds, the summary lists the one changed function (not the counters),
/// and the patches work on both programs: the plain one and the instrumented one
/// (whose patched code counts in new counters of its own).
#[test]
fn coverage_variant_in_the_default_build_does_not_stop_it_and_both_programs_patch_live() {
    let tree = fixture_tree();
    let out = tree.join("out");
    let said = build_ok(tree.path(), &out, &tree.join("fix.diff"), &[]);
    assert_source_restored(tree.path());
    for prog in ["prog", "prog-debug"] {
        let path = tree.join(prog);
        let kpatch = out.join(format!("{}.kpatch", build_id_of(&path).unwrap()));
        assert!(kpatch.is_file(), "no patch for {prog}:\n{said}");
        let line = said
            .lines()
            .find(|l| l.contains(&format!("patch for {} is in", path.display())))
            .unwrap_or_else(|| panic!("no summary line for {prog}:\n{said}"));
        assert!(
            line.ends_with("(1 function(s): value)"),
            "the summary must list functions only: {line}"
        );
    }
    check_live(&tree.join("prog"), &out);
    check_live(&tree.join("prog-debug"), &out);
}

/// Issue 17.8: a second, different fix for the same binary into the same directory
/// is refused and the first patch kept byte for byte (appliers look patches up as
/// `<build-id>.kpatch`, so two cannot sit side by side); rerunning the same fix is fine.
#[test]
fn a_different_second_patch_for_the_same_binary_never_replaces_the_first() {
    let tree = fixture_tree();
    let out = tree.join("out");
    let fix = tree.join("fix.diff");
    build_ok(tree.path(), &out, &fix, &[]);
    let first = out.join(format!(
        "{}.kpatch",
        build_id_of(&tree.join("prog")).unwrap()
    ));

    // The same fix again (its header's build time differs): replaced quietly.
    build_ok(tree.path(), &out, &fix, &[]);
    let bytes = std::fs::read(&first).unwrap();

    let second = tree.join("second.diff");
    let diff = std::fs::read_to_string(&fix).unwrap();
    std::fs::write(&second, diff.replace("-(n * 3)", "-(n * 4)")).unwrap();
    let o = build(tree.path(), &out, &second, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "a second fix replaced the first:\n{t}");
    assert!(
        t.contains(&format!(
            "{} already holds a different patch",
            first.display()
        )) && t.contains("it was kept"),
        "{t}"
    );
    assert!(
        std::fs::read(&first).unwrap() == bytes,
        "the first patch was changed"
    );
    assert_source_restored(tree.path());
    // The kept patch is still the first fix.
    check_live(&tree.join("prog"), &out);
}

/// Issue 17.4: in a tree that is already built, make has nothing to do; livecare
/// makes it compile the files the diff changes (in its private copy of the tree), so
/// the build works with no flags, and with `--clean` too.
#[test]
fn an_already_built_tree_gives_a_patch_without_clean() {
    let tree = fixture_tree();
    let make = Command::new("make")
        .current_dir(tree.path())
        .output()
        .unwrap();
    assert!(make.status.success(), "{}", text(&make));
    let out = tree.join("out");
    let fix = tree.join("fix.diff");
    build_ok(tree.path(), &out, &fix, &[]);
    assert_source_restored(tree.path());
    check_live(&tree.join("prog"), &out);

    let out = tree.join("out-clean");
    build_ok(tree.path(), &out, &fix, &["--clean"]);
    check_live(&tree.join("prog"), &out);
}
