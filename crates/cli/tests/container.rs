//! `livecare inspect` and `livecare make` / `kpatch_make` on the peers' real patch files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::Scratch;

const BUILD_ID: &str = "7788a89bcdbac583d60693ece924593d0d07e6a9";

fn livecare() -> Command {
    Command::new(env!("CARGO_BIN_EXE_livecare"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running livecare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "livecare panicked: {stderr}");
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Copies an interop vector into `scratch` and returns the copy's path.
fn interop(scratch: &Scratch, name: &str) -> PathBuf {
    let dir = testkit::interop_dir().expect("../shared/interop is missing");
    let copy = scratch.join(name);
    std::fs::copy(dir.join(name), &copy).unwrap();
    copy
}

/// Writes the inner ELF of an interop file (from kpatch_offset to the end) to `out`.
fn extract_elf(file: &Path, out: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let patch = kpatch_file::PatchFile::parse(&bytes).unwrap();
    std::fs::write(out, patch.elf()).unwrap();
    patch.header().build_time
}

#[test]
fn inspect_shows_both_peer_files() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    for (name, layout, id) in [
        // No id in LibCare's header: the ELF's hash, the id every command shows.
        (
            "foo.libcare.kpatch",
            "LibCare layout",
            " (none in the header: the hash of the ELF, as the applier names it)",
        ),
        (
            "foo.libcareplus.kpatch",
            "LibcarePlus layout",
            "patch id:       0001",
        ),
    ] {
        let path = interop(&s, name);
        let out = run(livecare().arg("inspect").arg(&path));
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert!(stdout.contains(layout), "{stdout}");
        assert!(stdout.contains(BUILD_ID), "{stdout}");
        assert!(stdout.contains(id), "{stdout}");
        assert!(stdout.contains(".kpatch.info: 1 record(s)"), "{stdout}");
        assert!(
            stdout.contains("name report.kpatch  daddr report (dlen 0x36)  saddr report.kpatch"),
            "{stdout}"
        );
        assert!(
            stdout.contains("R_X86_64_REX_GOTPCRELX   stdout@GLIBC_2.2.5 - 0x4"),
            "{stdout}"
        );
    }
}

#[test]
fn inspect_json_is_one_document() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let path = interop(&s, "foo.libcareplus.kpatch");
    let out = run(livecare().args(["inspect", "--json"]).arg(&path));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["build_id"], BUILD_ID);
    assert_eq!(v["header"]["patch_id"], "0001");
    assert_eq!(v["elf"]["kpatch_info"][0]["daddr_symbol"], "report");
    assert_eq!(v["elf"]["sections"].as_array().unwrap().len(), 44);
}

#[test]
fn inspect_rejects_corrupted_files_with_the_field_and_offset() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let good = std::fs::read(interop(&s, "foo.libcareplus.kpatch")).unwrap();
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt); 5] = [
        ("header.kpatch_offset at 0x98", |b| {
            b[152..156].copy_from_slice(&16384u32.to_le_bytes())
        }),
        ("elf.e_shnum at 0x234", |b| {
            b[504 + 60..504 + 62].copy_from_slice(&[0xff, 0xff])
        }),
        ("header.magic at 0x0", |b| b[0] = 0),
        ("header.total_size at 0xa0", |b| b.truncate(3000)),
        ("elf.e_type at 0x208", |b| b[504 + 16] = 3),
    ];
    for (expect, corrupt) in cases {
        let mut bytes = good.clone();
        corrupt(&mut bytes);
        let path = s.write("bad.kpatch", &bytes).unwrap();
        let out = run(livecare().arg("inspect").arg(&path));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{expect}: {stderr}");
        assert!(stderr.contains("is not a valid patch file"), "{stderr}");
        assert!(stderr.contains(expect), "expected {expect:?} in {stderr}");
        assert!(
            out.stdout.is_empty(),
            "printed a report for an invalid file"
        );
    }
    let out = run(livecare().arg("inspect").arg(s.join("missing.kpatch")));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn make_rewraps_an_extracted_elf_with_a_new_patch_id() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let orig = interop(&s, "foo.libcareplus.kpatch");
    let elf = s.join("patch.o");
    let time = extract_elf(&orig, &elf);
    let out_path = s.join("rewrapped.kpatch");
    let out = run(livecare()
        .env("SOURCE_DATE_EPOCH", time.to_string())
        .args(["make", "--no-csum", "-b", BUILD_ID, "-i", "0002", "-o"])
        .arg(&out_path)
        .arg(&elf));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("patch id 0002"),
        "{}",
        text(&out.stderr)
    );

    // Same bytes as LibcarePlus' own output except the id field.
    let made = std::fs::read(&out_path).unwrap();
    let mut expected = std::fs::read(&orig).unwrap();
    expected[8..12].copy_from_slice(b"0002");
    assert_eq!(made, expected);

    let out = run(livecare().arg("inspect").arg(&out_path));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("patch id:       0002"), "{stdout}");
    assert!(stdout.contains(BUILD_ID), "{stdout}");
}

#[test]
fn kpatch_make_symlink_reproduces_the_libcare_file() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let orig = interop(&s, "foo.libcare.kpatch");
    let elf = s.join("patch.o");
    let time = extract_elf(&orig, &elf);
    let tool = s.join("kpatch_make");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_livecare"), &tool).unwrap();

    let help = run(Command::new(&tool).arg("-h"));
    let usage = text(&help.stdout);
    assert_eq!(help.status.code(), Some(0));
    assert!(usage.contains("Usage: kpatch_make"), "{usage}");
    assert!(usage.contains("-b, --buildid <BUILDID>"), "{usage}");
    assert!(usage.contains("-i, --id <PATCHID>"), "{usage}");
    assert!(usage.contains("-o, --output <OUT>"), "{usage}");

    let out_path = s.join("out.kpatch");
    let out = run(Command::new(&tool)
        .env("SOURCE_DATE_EPOCH", time.to_string())
        .args(["--format", "libcare", "--no-csum", "-b", BUILD_ID, "-o"])
        .arg(&out_path)
        .arg(&elf));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&orig).unwrap()
    );
}

#[test]
fn make_writes_buildid_kpatch_by_default() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let elf = s.join("patch.o");
    extract_elf(&interop(&s, "foo.libcareplus.kpatch"), &elf);
    let out = run(livecare()
        .current_dir(s.path())
        .args(["make", "-b", BUILD_ID, "patch.o"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let made = s.join(format!("{BUILD_ID}.kpatch"));
    let bytes = std::fs::read(&made).unwrap();
    let patch = kpatch_file::PatchFile::parse(&bytes).unwrap();
    assert_eq!(patch.layout(), kpatch_file::Layout::LibCarePlus);
    assert_eq!(patch.header().patch_id(), None);
    assert_eq!(
        patch.header().csum,
        kpatch_file::crc32(patch.elf()),
        "no checksum by default"
    );
}

#[test]
fn make_rejects_bad_ids_and_inputs_with_exit_1() {
    testkit::needs_interop!();
    let s = Scratch::new().unwrap();
    let elf = s.join("patch.o");
    extract_elf(&interop(&s, "foo.libcareplus.kpatch"), &elf);
    let not_elf = s.write("notelf.o", [0u8; 256]).unwrap();
    let out_path = s.join("out.kpatch");
    let bad: [(&[&str], &Path, &str); 6] = [
        (&["-b", "xyz"], &elf, "is not hexadecimal"),
        (&["-b", "7788a"], &elf, "odd number of hex digits"),
        (
            &["-b", &"ab".repeat(128)],
            &elf,
            "longer than 40 hex digits",
        ),
        (
            &["-b", BUILD_ID, "-i", "12345678"],
            &elf,
            "longer than 7 characters",
        ),
        (
            &["-b", BUILD_ID, "-i", "0002", "--format", "libcare"],
            &elf,
            "no patch id field",
        ),
        (&["-b", BUILD_ID], &not_elf, "elf.e_ident[EI_MAG] at 0x0"),
    ];
    for (flags, input, expect) in bad {
        let out = run(livecare()
            .arg("make")
            .args(flags)
            .arg("-o")
            .arg(&out_path)
            .arg(input));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{flags:?}: expected {expect:?} in {stderr}"
        );
        assert!(
            !out_path.exists(),
            "{flags:?}: wrote output despite the error"
        );
    }
    let out = run(livecare().args(["make", "-o"]).arg(&out_path).arg(&elf));
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing -b must be a usage error"
    );
}

#[test]
fn make_wraps_a_fresh_gcc_object() {
    let s = Scratch::new().unwrap();
    let src = s.write(
        "p.c",
        "int counter;\nint report(int n) { return n + counter; }\nint report_kpatch(int n) { return 2 * n; }\n",
    )
    .unwrap();
    let obj = testkit::gcc(&[&src], &s.join("p.o"), testkit::Link::Object, &["-O2"]).unwrap();
    let out_path = s.join("p.kpatch");
    let out = run(livecare()
        .args(["make", "-b", "deadbeef", "-i", "7", "-o"])
        .arg(&out_path)
        .arg(&obj));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(livecare().args(["inspect", "--json"]).arg(&out_path));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["build_id"], "deadbeef");
    let names: Vec<&str> = v["elf"]["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.contains(&"report") && names.contains(&"report_kpatch"),
        "{names:?}"
    );
}
