//! Issue 17 (items 3, 4, 8): `livecare build` never touches the operator's tree, its
//! binaries or its running programs, and works on a tree that is already built. The
//! fixture is nginx-shaped: `./configure` links probe programs and deletes them, the
//! program is `objs/server`, and `make clean` deletes the outputs (and, with
//! `CLEAN_EXTRA=Makefile`, the Makefile too, as nginx's does).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::{build_id_of, Running, Scratch};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(30);

const CASE: &str = "build-isolation";

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

/// Runs `livecare ARGS` in `dir` with `env`; a run longer than three minutes fails.
fn livecare_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(livecare())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("livecare {args:?} hung:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    let t = text(&out);
    assert!(out.status.success(), "{what} failed ({}):\n{t}", out.status);
    t
}

/// Whether the build ran in livecare's private copy of the tree; prints a loud
/// banner when it could not (not root, no overlayfs): the checks of the tree then
/// do not apply.
fn private(build_output: &str) -> bool {
    if build_output.contains("building in the tree itself") {
        eprintln!(
            "\n\n==== SKIPPED: livecare cannot build in a private copy of the tree here \
             (needs root and overlayfs) ====\n{build_output}\n"
        );
        return false;
    }
    true
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    ok(out, script);
}

/// A copy of the fixture, configured and built with its own `./configure && make`.
fn built_tree() -> Scratch {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture(CASE).unwrap();
    sh(tree.path(), "./configure >/dev/null && make >/dev/null");
    tree
}

fn kpatch_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Everything about every entry of the tree a build could change: type, mode, inode,
/// size, modification time and contents (symlink targets), by relative path.
/// `skip` names top-level entries left out (the output directory).
fn snapshot(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                format!("file {h:016x}")
            } else {
                "dir".to_string()
            };
            out.insert(
                rel,
                format!(
                    "{what} mode={:o} ino={} size={} mtime={}.{:09}",
                    m.mode(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
            if m.is_dir() {
                walk(root, &path, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

/// Fails naming every entry that differs between two snapshots.
fn assert_same_tree(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>) {
    let mut diffs = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            Some(a) if a == b => {}
            Some(a) => diffs.push(format!("changed {}: {b} => {a}", p.display())),
            None => diffs.push(format!("deleted {}", p.display())),
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("added {}", p.display()));
    }
    assert!(diffs.is_empty(), "the tree changed:\n{}", diffs.join("\n"));
}

/// `n=N reply=R` of the fixture's server.
fn reply(line: &str) -> Option<(i64, i64)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    Some((field("n=")?, field("reply=")?))
}

/// Waits for five lines in a row computed with `factor` (2 original, 3 patched).
fn expect_factor(p: &mut Running, factor: i64) {
    let mut run = 0;
    while run < 5 {
        let line = p
            .wait_for_match(|l| reply(l).is_some(), WAIT)
            .unwrap_or_else(|e| panic!("waiting for reply = {factor}n: {e:#}"));
        let (n, r) = reply(&line).unwrap();
        run = if r == factor * n { run + 1 } else { 0 };
    }
}

/// The running server's executable was not deleted or replaced under it.
fn assert_exe_intact(p: &Running, exe: &Path) {
    let link = std::fs::read_link(format!("/proc/{}/exe", p.pid())).unwrap();
    assert_eq!(
        link,
        exe.canonicalize().unwrap(),
        "the running program's file was deleted or replaced"
    );
}

/// Patches `pid` with `dir`, checks the new behaviour, unpatches, checks the old.
fn patch_and_unpatch(p: &mut Running, dir: &Path) {
    let pid = p.pid().to_string();
    ok(
        livecare_in(
            Path::new("/"),
            &["patch", "-p", &pid, &dir.to_string_lossy()],
            &[],
        ),
        "livecare patch",
    );
    expect_factor(p, 3);
    ok(
        livecare_in(Path::new("/"), &["unpatch", "-p", &pid], &[]),
        "livecare unpatch",
    );
    expect_factor(p, 2);
    assert!(p.is_alive());
    assert_eq!(p.proc_state().unwrap().1, 0, "left traced");
}

/// Item 4: a tree built with its own `./configure && make`, its program running.
/// `livecare build FIX.diff` with no flags gives a patch for that very program (its
/// build-id), which applies and unpatches; the tree (sources, objects, program,
/// timestamps, inodes) is exactly as before.
#[test]
fn an_already_built_tree_gives_a_patch_for_its_running_program_and_is_not_touched() {
    let tree = built_tree();
    let exe = tree.join("objs/server");
    let mut p = Running::start(&exe, &[]).unwrap();
    expect_factor(&mut p, 2);
    // As if an earlier build had made it: the output directory is the one part of
    // the tree a build writes.
    std::fs::create_dir(tree.join("patches")).unwrap();
    let before = snapshot(tree.path(), &["patches"]);

    let t = ok(
        livecare_in(tree.path(), &["build", "fix.diff"], &[]),
        "livecare build fix.diff (already-built tree)",
    );
    if !private(&t) {
        return;
    }
    let id = build_id_of(&exe).unwrap();
    assert_eq!(
        kpatch_files(&tree.join("patches")),
        [tree.join(format!("patches/{id}.kpatch"))],
        "{t}"
    );
    assert_same_tree(&before, &snapshot(tree.path(), &["patches"]));
    assert_exe_intact(&p, &exe);
    patch_and_unpatch(&mut p, &tree.join("patches"));
}

/// Item 4: a build killed in its patched stage (the diff applied, the patched objects
/// built) leaves the tree exactly as it was, and the next run works. While it runs, a
/// second build of the same tree is refused.
#[test]
fn a_build_killed_in_its_patched_stage_leaves_the_tree_as_it_was_and_a_rerun_works() {
    let tree = built_tree();
    let before = snapshot(tree.path(), &[]);
    let scratch = Scratch::new().unwrap();
    let out = scratch.join("out");
    let reached = scratch.join("patched-stage-reached");
    // `make`, then, in the patched stage only, say so and wait to be killed.
    let cmd = format!(
        "make && if [ \"$KPATCH_STAGE\" = patched ]; then touch '{}'; exec sleep 60; fi",
        reached.display()
    );
    let mut child = Command::new(livecare())
        .args(["build", "-o", &out.to_string_lossy(), "fix.diff", "--"])
        .args(["sh", "-c", &cmd])
        .current_dir(tree.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reached.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "livecare ended ({status}) before its patched stage:\n{}",
                text(&out)
            );
        }
        assert!(Instant::now() < deadline, "the patched stage never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second build of the same tree meanwhile is refused, not mixed into this one.
    let second = livecare_in(
        tree.path(),
        &["build", "-o", &out.to_string_lossy(), "fix.diff"],
        &[],
    );
    let t = text(&second);
    assert_eq!(second.status.code(), Some(1), "{t}");
    assert!(t.contains("another livecare build is using"), "{t}");
    child.kill().unwrap();
    let killed = child.wait_with_output().unwrap();
    if !private(&text(&killed)) {
        return;
    }
    assert_same_tree(&before, &snapshot(tree.path(), &[]));

    let t = ok(
        livecare_in(
            tree.path(),
            &["build", "-o", &out.to_string_lossy(), "fix.diff"],
            &[],
        ),
        "livecare build after a killed one",
    );
    let id = build_id_of(&tree.join("objs/server")).unwrap();
    assert_eq!(
        kpatch_files(&out),
        [out.join(format!("{id}.kpatch"))],
        "{t}"
    );
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
    let mut p = Running::start(&tree.join("objs/server"), &[]).unwrap();
    patch_and_unpatch(&mut p, &out);
}

/// Item 3: `--clean` runs the project's clean, which deletes the outputs, in the
/// private copy only: the deployed (running) program is never deleted, and the patch
/// is for it. A clean that deletes the Makefile (nginx's) is named as the cause.
#[test]
fn clean_never_deletes_a_deployed_output_of_the_tree() {
    let tree = built_tree();
    let exe = tree.join("objs/server");
    let mut p = Running::start(&exe, &[]).unwrap();
    expect_factor(&mut p, 2);
    let before = snapshot(tree.path(), &[]);
    let scratch = Scratch::new().unwrap();
    let out = scratch.join("out");
    let out_s = out.to_string_lossy().into_owned();

    let t = ok(
        livecare_in(
            tree.path(),
            &["build", "--clean", "-o", &out_s, "fix.diff"],
            &[],
        ),
        "livecare build --clean",
    );
    if !private(&t) {
        return;
    }
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
    assert_exe_intact(&p, &exe);
    let id = build_id_of(&exe).unwrap();
    assert_eq!(
        kpatch_files(&out),
        [out.join(format!("{id}.kpatch"))],
        "{t}"
    );

    let o = livecare_in(
        tree.path(),
        &["build", "--clean", "-o", &out_s, "fix.diff"],
        &[("CLEAN_EXTRA", "Makefile")],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("deleted the Makefile") && t.contains("without --clean"),
        "{t}"
    );
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
    assert_exe_intact(&p, &exe);
    patch_and_unpatch(&mut p, &out);
}

/// Item 3: the build command runs a configure that links probe programs (nginx's
/// `objs/autotest`, and `probe-pagesize`, a name no wrapper knows) and deletes them:
/// they are not taken for outputs, and the patch is made.
#[test]
fn configure_probe_programs_that_are_deleted_do_not_stop_the_build() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture(CASE).unwrap();
    let scratch = Scratch::new().unwrap();
    let out = scratch.join("out");
    let t = ok(
        livecare_in(
            tree.path(),
            &[
                "build",
                "-o",
                &out.to_string_lossy(),
                "fix.diff",
                "--",
                "sh",
                "-c",
                "./configure && make",
            ],
            &[],
        ),
        "livecare build -- sh -c './configure && make'",
    );
    assert!(
        !t.contains("autotest:") && !t.contains("probe-pagesize:"),
        "{t}"
    );
    // The tree was not built: the original build's program was put there.
    let exe = tree.join("objs/server");
    let id = build_id_of(&exe).unwrap();
    assert_eq!(
        kpatch_files(&out),
        [out.join(format!("{id}.kpatch"))],
        "{t}"
    );
    let mut p = Running::start(&exe, &[]).unwrap();
    expect_factor(&mut p, 2);
    patch_and_unpatch(&mut p, &out);
}

/// Item 3: a fresh tree whose Makefile comes from its configure: the error says to
/// run that configure first (naming it), and nothing is built or written.
#[test]
fn a_fresh_tree_that_needs_its_configure_says_so() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture(CASE).unwrap();
    let before = snapshot(tree.path(), &[]);
    let o = livecare_in(tree.path(), &["build", "fix.diff"], &[]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("has no Makefile") && t.contains("./configure") && t.contains("-- sh -c"),
        "{t}"
    );
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
}

/// Item 8: without -o the patches go to SRCDIR/patches (not the current directory),
/// which holds the .kpatch files and nothing else (the work files live elsewhere).
#[test]
fn the_default_output_directory_is_srcdir_patches_and_holds_only_patches() {
    let tree = built_tree();
    let cwd = Scratch::new().unwrap();
    let t = ok(
        livecare_in(
            cwd.path(),
            &[
                "build",
                "-C",
                &tree.path().to_string_lossy(),
                &tree.join("fix.diff").to_string_lossy(),
            ],
            &[],
        ),
        "livecare build -C TREE",
    );
    assert!(
        std::fs::read_dir(cwd.path()).unwrap().next().is_none(),
        "livecare wrote into the current directory:\n{t}"
    );
    let id = build_id_of(&tree.join("objs/server")).unwrap();
    assert_eq!(
        kpatch_files(&tree.join("patches")),
        [tree.join(format!("patches/{id}.kpatch"))],
        "{t}"
    );
}

/// Without root the private copy lives in a user namespace that maps only the user's
/// own ids: a build by `nobody` in its own already-built tree makes the patch and
/// leaves the tree exactly as it was.
#[test]
fn a_user_other_than_root_builds_in_a_private_copy_too() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!(
            "\n\n==== SKIPPED: needs root and setpriv (util-linux) to run a build as nobody ====\n"
        );
        return;
    }
    // Whether this kernel lets nobody make a user namespace and mount an overlay there,
    // with the upper layer where livecare's default work directory is.
    let probe = tempfile::Builder::new()
        .prefix("livecare-userns-probe-")
        .tempdir_in("/var/tmp")
        .unwrap();
    sh(
        probe.path(),
        "mkdir l u w m && chown -R 65534:65534 . && chmod 755 .",
    );
    let userns = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
        ])
        .arg("mount -t overlay overlay -o lowerdir=l,upperdir=u,workdir=w,userxattr m")
        .current_dir(probe.path())
        .output()
        .unwrap();
    if !userns.status.success() {
        eprintln!(
            "\n\n==== SKIPPED: this kernel gives unprivileged users no overlay in a user \
             namespace ====\n{}\n",
            text(&userns)
        );
        return;
    }
    let tree = built_tree();
    let home = Scratch::new().unwrap();
    // nobody may not reach the workspace's target directory: a copy of livecare.
    let tool = home.join("livecare");
    std::fs::copy(livecare(), &tool).unwrap();
    let out = home.join("out");
    for dir in [tree.path(), home.path()] {
        sh(dir, "chown -R 65534:65534 .");
    }
    let before = snapshot(tree.path(), &[]);
    let work = probe.path().join("work");
    // Twice: the second build starts from the first one's work directory.
    for round in 0..2 {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&tool)
            .args(["build", "-o", &out.to_string_lossy()])
            .args(["--workdir", &work.to_string_lossy(), "fix.diff"])
            .current_dir(tree.path())
            .output()
            .unwrap();
        let t = ok(o, "livecare build as nobody");
        assert!(!t.contains("building in the tree itself"), "{t}");
        let id = build_id_of(&tree.join("objs/server")).unwrap();
        assert_eq!(
            kpatch_files(&out),
            [out.join(format!("{id}.kpatch"))],
            "{t}"
        );
        // The private copy is gone (overlayfs leaves directories only root could list).
        let left: Vec<_> = std::fs::read_dir(&work)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("tree"))
            .collect();
        assert!(left.is_empty(), "round {round}: left {left:?}\n{t}");
    }
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
}

/// Item 4: the tree was built with other flags than the build command uses: the
/// relinked program cannot be the tree's, so no patch is made and the error says what
/// differs and what to do; the tree is untouched.
#[test]
fn a_tree_built_otherwise_is_named_with_what_differs() {
    let tree = Scratch::new().unwrap();
    tree.copy_fixture(CASE).unwrap();
    sh(
        tree.path(),
        "./configure >/dev/null && make CFLAGS='-O0 -g' >/dev/null",
    );
    let before = snapshot(tree.path(), &[]);
    let scratch = Scratch::new().unwrap();
    let out = scratch.join("out");
    let o = livecare_in(
        tree.path(),
        &["build", "-o", &out.to_string_lossy(), "fix.diff"],
        &[],
    );
    let t = text(&o);
    if !private(&t) {
        return;
    }
    assert_eq!(o.status.code(), Some(1), "{t}");
    let id = build_id_of(&tree.join("objs/server")).unwrap();
    assert!(
        t.contains("objs/server")
            && t.contains(&id)
            && t.contains(".text size")
            && t.contains("Rebuild the tree exactly as it is deployed"),
        "{t}"
    );
    assert!(!out.exists() || kpatch_files(&out).is_empty(), "{t}");
    assert_same_tree(&before, &snapshot(tree.path(), &[]));
}

/// Issue 17 item 5: the program deployed from tree A (its own `./configure && make`,
/// running), and a pristine copy of the same source at another path B. `livecare
/// build -C B --target A/objs/server fix.diff` reproduces A's build (its debug info
/// names A's paths) and gives a patch for the running program's build-id, which
/// applies and unpatches; A is not touched. Once with A where it was built (the
/// build sees B mounted at A's path, privately), once with A moved away after its
/// build (gcc maps B's path to A's with -ffile-prefix-map). Before, both were refused
/// at once because the paths differ.
#[test]
fn a_copy_of_the_tree_at_another_path_gives_a_patch_for_the_deployed_program() {
    for moved in [false, true] {
        let holder = Scratch::new().unwrap();
        let a = holder.join("src");
        sh(
            holder.path(),
            &format!(
                "mkdir src && cp -r {}/. src/",
                testkit::fixture_dir(CASE).display(),
            ),
        );
        sh(&a, "./configure >/dev/null && make >/dev/null");
        let deployed_dir = if moved {
            let to = holder.join("moved");
            std::fs::rename(&a, &to).unwrap();
            to
        } else {
            a.clone()
        };
        let exe = deployed_dir.join("objs/server");
        let id = build_id_of(&exe).unwrap();
        let mut p = Running::start(&exe, &[]).unwrap();
        expect_factor(&mut p, 2);
        let before = snapshot(&deployed_dir, &[]);

        let b = Scratch::new().unwrap();
        b.copy_fixture(CASE).unwrap();
        sh(b.path(), "./configure >/dev/null");
        let t = ok(
            livecare_in(
                b.path(),
                &[
                    "build",
                    "-C",
                    ".",
                    "--target",
                    exe.to_str().unwrap(),
                    "fix.diff",
                ],
                &[],
            ),
            &format!("livecare build --target (deployed tree moved: {moved})"),
        );
        assert!(t.contains("bit-identical"), "{t}");
        let route = if !moved && !t.contains("building in the tree itself") {
            "a private mount"
        } else {
            "-ffile-prefix-map"
        };
        assert!(t.contains(route), "expected the {route} route:\n{t}");
        assert_eq!(
            kpatch_files(&b.join("patches")),
            [b.join(format!("patches/{id}.kpatch"))],
            "{t}"
        );
        assert_same_tree(&before, &snapshot(&deployed_dir, &[]));
        assert_exe_intact(&p, &exe);
        patch_and_unpatch(&mut p, &b.join("patches"));
    }
}
