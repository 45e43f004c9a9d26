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
            .find(|l| l.contains(&format!(" for {} is in", path.display())))
            .unwrap_or_else(|| panic!("no summary line for {prog}:\n{said}"));
        // The `__PRETTY_FUNCTION__` string the fix adds is data, listed apart (issue
        // 17.8), as are prog-debug's new counters.
        assert!(
            line.contains("(1 function(s): value; ")
                && line.contains(" data object(s): ")
                && line.contains("__PRETTY_FUNCTION__.0"),
            "the summary must list functions and data apart: {line}"
        );
        assert!(
            said.contains(&format!(
                "1 function(s) [value], {}",
                if prog == "prog" {
                    "1 data object(s) [__PRETTY_FUNCTION__.0]"
                } else {
                    "2 data object(s) [__PRETTY_FUNCTION__.0, __gcov0.value]"
                }
            )),
            "{said}"
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

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

/// Issue 17.8: a patch has one id, printed the same by `build`, `inspect`, `patch`,
/// `info` and `unpatch` (text and JSON): the header's id with `-i`, else the hash of
/// the patch the applier writes into the target's region.
#[test]
fn one_patch_id_everywhere_with_and_without_dash_i() {
    let tree = fixture_tree();
    for (sub, extra, want) in [
        ("auto", &[][..], None),
        ("named", &["-i", "fix42"][..], Some("fix42")),
    ] {
        let out = tree.join(sub);
        let o = build(tree.path(), &out, &tree.join("fix.diff"), extra);
        assert!(o.status.success(), "build failed:\n{}", text(&o));
        let prog = tree.join("prog");
        let kpatch = out.join(format!("{}.kpatch", build_id_of(&prog).unwrap()));
        // `build`: "<file>: patch <id>, ...".
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{}: patch ", kpatch.display())))
            .unwrap_or_else(|| panic!("no summary line for {}:\n{stdout}", kpatch.display()));
        let id = line
            .split_whitespace()
            .nth(2)
            .unwrap()
            .trim_end_matches(',')
            .to_string();
        match want {
            Some(w) => assert_eq!(id, w, "{line}"),
            None => assert!(
                id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "a patch without -i is named by its hash: {line}"
            ),
        }
        let k = kpatch.to_string_lossy().to_string();
        let insp = run_livecare(&["inspect", &k]);
        assert!(
            insp.lines()
                .any(|l| l.trim_start().starts_with(&format!("patch id:       {id}"))),
            "inspect:\n{insp}"
        );
        let insp = json(&run_livecare(&["inspect", "--json", &k]));
        assert_eq!(insp["patch_id"], id.as_str(), "inspect --json: {insp}");

        let mut p = Running::start(&prog, &[]).unwrap();
        let pid = p.pid().to_string();
        expect(&mut p, "original", |n, v| v == 2 * n + 1);
        let said = run_livecare(&["patch", "-p", &pid, &k]);
        assert!(said.contains(&format!("patch {id})")), "patch text: {said}");
        expect(&mut p, "patched", |n, v| v == -(3 * n));
        run_livecare(&["unpatch", "-p", &pid]);
        let said = json(&run_livecare(&["patch", "--json", "-p", &pid, &k]));
        assert_eq!(
            said["patched"][0]["patch_id"],
            id.as_str(),
            "patch --json: {said}"
        );
        let info = run_livecare(&["info", "-p", &pid]);
        assert!(info.contains(&format!("patch {id}: ")), "info:\n{info}");
        let info = json(&run_livecare(&["info", "--json", "-p", &pid]));
        let ids: Vec<&serde_json::Value> = info
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["objects"].as_array().into_iter().flatten())
            .flat_map(|o| o["patches"].as_array().into_iter().flatten())
            .map(|p| &p["patch_id"])
            .collect();
        assert_eq!(ids, [id.as_str()], "info --json: {info}");
        let said = run_livecare(&["unpatch", "-p", &pid]);
        assert!(
            said.contains(&format!("unpatched {id} ")),
            "unpatch text: {said}"
        );
        // Lines printed while the patch was on before are old news.
        p.drain();
        expect(&mut p, "original again", |n, v| v == 2 * n + 1);
        run_livecare(&["patch", "-p", &pid, &k]);
        let said = json(&run_livecare(&["unpatch", "--json", "-p", &pid]));
        assert_eq!(
            said["unpatched"][0]["patch_id"],
            id.as_str(),
            "unpatch --json: {said}"
        );
        assert!(p.is_alive());
    }
}

/// Issue 17.7: the log path is printed before the original stage starts; without a
/// terminal a running stage prints the units compiled so far (here every poll:
/// `LIVECARE_PROGRESS_SECS=0`), against the previous stage's count once there is
/// one; `--json` gives the result on stdout, on success and on failure.
#[test]
fn build_progress_names_the_log_first_and_json_gives_the_result() {
    let tree = fixture_tree();
    let out = tree.join("out");
    let fix = tree.join("fix.diff");
    // One unit, then a pause the progress poll (every 250 ms) cannot miss, then the rest.
    let cmd = ["sh", "-c", "make prog-main.o && sleep 2 && make && sleep 2"];
    let o = Command::new(livecare())
        .current_dir("/")
        .env("LIVECARE_PROGRESS_SECS", "0")
        .args(["build", "--json", "-C"])
        .arg(tree.path())
        .arg("-o")
        .arg(&out)
        .arg(&fix)
        .arg("--")
        .args(cmd)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{}", text(&o));
    let doc = json(&String::from_utf8_lossy(&o.stdout));
    let log = doc["log"]
        .as_str()
        .unwrap_or_else(|| panic!("no log: {doc}"));
    let pos = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} on stderr:\n{err}"))
    };
    assert!(
        pos(&format!("full build log: {log}")) < pos("building original code ..."),
        "the log path must come before the original stage:\n{err}"
    );
    pos("building original code: 1 file(s) compiled, ");
    // The patched stage counts against the original stage's 4 units (the trailing
    // pause makes sure a poll sees its final count).
    assert!(
        err.lines()
            .any(|l| l.starts_with("livecare: building patched code: ")
                && l.contains("/~4 file(s) compiled, ")),
        "{err}"
    );
    assert_eq!(doc["ok"], true, "{doc}");
    assert!(doc["error"].is_null(), "{doc}");
    let prog = tree.join("prog");
    let patches = doc["patches"].as_array().unwrap();
    let p = patches
        .iter()
        .find(|p| p["object"] == prog.to_str().unwrap())
        .unwrap_or_else(|| panic!("no patch for prog: {doc}"));
    let bid = build_id_of(&prog).unwrap();
    let kpatch = out.join(format!("{bid}.kpatch"));
    assert_eq!(p["build_id"], bid.as_str(), "{p}");
    assert_eq!(p["path"], kpatch.to_str().unwrap(), "{p}");
    assert_eq!(p["size"], std::fs::metadata(&kpatch).unwrap().len(), "{p}");
    assert_eq!(p["functions"], serde_json::json!(["value"]), "{p}");
    assert_eq!(
        p["data"],
        serde_json::json!(["__PRETTY_FUNCTION__.0"]),
        "{p}"
    );
    let id = p["patch_id"].as_str().unwrap();
    assert!(
        run_livecare(&["inspect", kpatch.to_str().unwrap()]).contains(id),
        "patch id {id}"
    );
    let stages: Vec<&str> = doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    // `restore` only when the build ran in the tree itself (no private overlay).
    let mut want = vec![
        "check-patches",
        "original",
        "apply-patches",
        "patched",
        "make-patches",
    ];
    if stages.last() == Some(&"restore") {
        want.push("restore");
    }
    assert_eq!(stages, want);
    let original = &doc["stages"][1];
    assert!(
        original["ok"] == true && original["seconds"].as_f64().unwrap() >= 2.0,
        "{original}"
    );

    // A failure is a document too, naming the error; exit status 1.
    let bad = tree.join("bad.diff");
    std::fs::write(
        &bad,
        "--- a/value.c\n+++ b/value.c\n@@ -1 +1 @@\n-nothing\n+here\n",
    )
    .unwrap();
    let o = Command::new(livecare())
        .args(["build", "--json", "-C"])
        .arg(tree.path())
        .arg("-o")
        .arg(&out)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let doc = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(doc["ok"], false, "{doc}");
    assert!(
        doc["error"].as_str().unwrap().contains("does not apply"),
        "{doc}"
    );
    assert_eq!(doc["stages"][0]["stage"], "check-patches", "{doc}");
    assert_eq!(doc["stages"][0]["ok"], false, "{doc}");
    assert_source_restored(tree.path());
}
