//! The command line itself: help, usage errors and the LibCare tool-name faces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::Scratch;

fn livecare() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livecare"))
}

fn run(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().expect("spawn")
}

/// Symlinks every LibCare tool name into a scratch dir with `livecare install-links`.
fn linked_tools() -> (Scratch, PathBuf) {
    let dir = Scratch::new().unwrap();
    let bin = dir.join("bin");
    let out = run(&livecare(), &["install-links", bin.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, bin)
}

#[test]
fn livecare_help_lists_every_subcommand() {
    let out = run(&livecare(), &["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in [
        "build",
        "patch",
        "unpatch",
        "info",
        "run",
        "demo",
        "gensrc",
        "strip",
        "make",
        "inspect",
        "install-links",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}:\n{text}");
    }
}

#[test]
fn every_libcare_name_prints_usage_for_h() {
    let (_dir, bin) = linked_tools();
    for (tool, flag) in [
        ("libcare-ctl", "-h"),
        ("libcare-patch-make", "-h"),
        ("kpatch_gensrc", "-h"),
        ("kpatch_strip", "-h"),
        ("kpatch_make", "-h"),
        // libcare-cc is gcc-compatible: its help is the compiler's.
        ("libcare-cc", "--help"),
    ] {
        let out = run(&bin.join(tool), &[flag]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{tool} {flag}: {out:?}");
        assert!(
            text.contains("Usage"),
            "{tool} {flag} printed no usage:\n{text}"
        );
        if tool != "libcare-cc" {
            assert!(
                text.contains(tool),
                "{tool} usage does not name the tool:\n{text}"
            );
        }
    }
}

#[test]
fn unknown_flags_are_usage_errors_with_exit_2() {
    let (_dir, bin) = linked_tools();
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (livecare(), vec!["--no-such-flag"]),
        (livecare(), vec!["patch", "--no-such-flag"]),
        (livecare(), vec!["no-such-command"]),
        (bin.join("libcare-ctl"), vec!["patch", "--no-such-flag"]),
        (bin.join("libcare-ctl"), vec!["frobnicate"]),
        (bin.join("libcare-patch-make"), vec!["--no-such-flag"]),
        (bin.join("kpatch_gensrc"), vec!["--no-such-flag"]),
        (bin.join("kpatch_strip"), vec!["--no-such-flag"]),
        (bin.join("kpatch_make"), vec!["--no-such-flag"]),
    ];
    for (exe, args) in cases {
        let out = run(&exe, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{} {args:?}: {err}",
            exe.display()
        );
        assert!(
            err.contains("error"),
            "{} {args:?}: no message: {err}",
            exe.display()
        );
    }
}

#[test]
fn install_links_refuses_to_overwrite_without_force() {
    let (_dir, bin) = linked_tools();
    let again = run(&livecare(), &["install-links", bin.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = run(
        &livecare(),
        &["install-links", "--force", bin.to_str().unwrap()],
    );
    assert!(forced.status.success());
    let target = std::fs::read_link(bin.join("kpatch_make")).unwrap();
    assert_eq!(target.file_name().unwrap(), "livecare");
}
