//! Scale test on the SQLite amalgamation (about 2.2 million lines of assembly at
//! -O2 -g). Runs in CI: the two compiles run in parallel and dominate its time. When
//! Debian's source archive is unreachable it skips with a loud message.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use asm_diff::{gensrc, Options};
use common::*;

/// Runs an apt-get with a private configuration: never the system's sources,
/// lists or caches.
fn apt(dir: &Path, cwd: &Path, args: &[&str]) -> bool {
    let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
    let status = Command::new("apt-get")
        .current_dir(cwd)
        .args(["-q", "-o"])
        .arg(opt("Dir::Etc::SourceList", &dir.join("sources.list")))
        .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
        .arg(opt("Dir::State::Lists", &dir.join("lists")))
        .arg("-o")
        .arg(opt("Dir::Cache", &dir.join("cache")))
        .args(["-o", "Debug::NoLocking=1"])
        .args(args)
        .status();
    matches!(status, Ok(s) if s.success())
}

fn skip(why: &str) {
    testkit::skip_banner(&format!(
        "the SQLite amalgamation from Debian's archive (network): {why}"
    ));
}

#[test]
fn sqlite_amalgamation_against_itself_is_unchanged_and_one_line_change_is_one_function() {
    let tmp = testkit::Scratch::new().unwrap();
    let apt_dir = tmp.join("apt");
    for d in ["lists/partial", "cache/archives/partial", "src"] {
        std::fs::create_dir_all(apt_dir.join(d)).unwrap();
    }
    std::fs::write(
        apt_dir.join("sources.list"),
        "deb-src http://deb.debian.org/debian bookworm main\n",
    )
    .unwrap();
    let src = apt_dir.join("src");
    if !apt(&apt_dir, &src, &["update"]) {
        return skip("`apt-get update` of the Debian bookworm deb-src index failed (no network?)");
    }
    if !apt(&apt_dir, &src, &["source", "--download-only", "sqlite3"]) {
        return skip("`apt-get source sqlite3` failed");
    }
    let tarball = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".orig.tar.xz"))
        .expect("no sqlite3 .orig.tar.xz downloaded");
    testkit::run_ok(
        Command::new("tar")
            .arg("xJf")
            .arg(&tarball)
            .current_dir(&src),
    )
    .unwrap();
    let tree = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("sqlite")
        })
        .expect("no sqlite source tree");
    testkit::run_ok(Command::new("./configure").current_dir(&tree)).unwrap();
    testkit::run_ok(Command::new("make").arg("sqlite3.c").current_dir(&tree)).unwrap();

    let c = std::fs::read_to_string(tree.join("sqlite3.c")).unwrap();
    let needle = "SQLITE_API int sqlite3_libversion_number(void){ return SQLITE_VERSION_NUMBER; }";
    assert!(
        c.contains(needle),
        "sqlite3.c no longer has the line this test edits"
    );
    let patched_c = tmp
        .write(
            "patched/sqlite3.c",
            c.replace(needle, &needle.replace("NUMBER;", "NUMBER + 1;")),
        )
        .unwrap();
    let (os, ps) = (tmp.join("orig.s"), tmp.join("patched.s"));
    let inc = format!("-I{}", tree.display());
    // The two compiles dominate the test's time; run them on both cores.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            compile_s(
                &tree.join("sqlite3.c"),
                &os,
                &["-O2", "-g"],
                std::slice::from_ref(&inc),
            )
        });
        scope.spawn(|| compile_s(&patched_c, &ps, &["-O2", "-g"], std::slice::from_ref(&inc)));
    });
    let o = std::fs::read_to_string(&os).unwrap();
    let p = std::fs::read_to_string(&ps).unwrap();
    let lines = o.lines().count();

    let t = Instant::now();
    let same = gensrc(&o, &o, &Options::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "gensrc sqlite3 against itself: {lines} lines x2 in {secs:.2} s ({:.0} lines/s)",
        2.0 * lines as f64 / secs
    );
    assert!(
        same.changed.is_empty() && same.added.is_empty(),
        "self-diff changed {:?} added {:?}",
        same.changed,
        same.added
    );
    assert_eq!(same.asm, o);

    let d = gensrc(&o, &p, &Options::default()).unwrap();
    assert_eq!(d.changed, vec!["sqlite3_libversion_number".to_string()]);
    assert!(d.added.is_empty(), "added {:?}", d.added);
    let out = tmp.write("out.s", &d.asm).unwrap();
    let (oo, ao) = (tmp.join("orig.o"), tmp.join("out.o"));
    assemble(&os, &oo);
    assemble(&out, &ao);
    assert_same_except_kpatch(&oo, &ao);
}
