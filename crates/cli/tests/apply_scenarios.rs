//! Apply scenarios against gcc-built fixtures (tests/fixtures/scenario-*), patches
//! made by our own pipeline (testkit::patchbuild): visible output changes after
//! `patch`, the original behaviour returns after `unpatch`, the process keeps running.

mod common;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use common::*;
use testkit::patchbuild::{Builder, Flags, Object, Patch};
use testkit::{Link, MemorySnapshot, Running, Scratch};

const WAIT: Duration = Duration::from_secs(5);

fn builder(s: &Scratch, fixture: &str, link: Link, opt: &str) -> Result<Builder> {
    // --force-gotpcrel: glibc data the original never imported (stderr) lives in
    // libc, further than 2 GiB away, and must be reached through a GOT slot.
    let flags = Flags {
        exe_link: link,
        opt: opt.into(),
        force_gotpcrel: true,
        ..Flags::default()
    };
    Builder::new(&livecare(), &testkit::fixture_dir(fixture), s.path(), flags)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `exe`, waits for `before`, patches with `patch`, waits for `after`,
/// unpatches, waits for `before` again.
fn round_trip(exe: &Object, args: &[&str], patch: &Path, before: &str, after: &str) -> Result<()> {
    let mut p = Running::start(&exe.path, args)?;
    p.wait_for(before, WAIT)?;
    let pid = p.pid().to_string();
    let out = ok(&lc(&["patch", "-p", &pid, path(patch)]))?;
    assert!(out.contains("patched"), "{out}");
    p.drain();
    p.wait_for(after, WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    p.drain();
    p.wait_for(before, WAIT)?;
    assert!(p.is_alive());
    assert_eq!(p.proc_state()?.1, 0, "left traced");
    Ok(())
}

fn exe_case(
    link: Link,
    opt: &str,
    patched: &str,
    args: &[&str],
    before: &str,
    after: &str,
) -> Result<()> {
    let s = Scratch::new()?;
    let b = builder(&s, "scenario-exe", link, opt)?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, patched, "0001")?;
    round_trip(&exe, args, &patch.path, before, after)
}

#[test]
fn patch_one_function_pie_o2() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-basic.c",
        &[],
        "value=1",
        "value=2",
    )
}

#[test]
fn patch_one_function_no_pie_o0() -> Result<()> {
    exe_case(
        Link::NoPie,
        "-O0",
        "patched-basic.c",
        &[],
        "value=1",
        "value=2",
    )
}

#[test]
fn patch_one_function_pie_o0_and_no_pie_o2() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O0",
        "patched-basic.c",
        &[],
        "value=1",
        "value=2",
    )?;
    exe_case(
        Link::NoPie,
        "-O2",
        "patched-basic.c",
        &[],
        "value=1",
        "value=2",
    )
}

#[test]
fn patch_adds_a_new_function() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-newfn.c",
        &[],
        "value=1",
        "value=42",
    )
}

#[test]
fn patched_code_calls_unchanged_original_function_with_one_and_three_threads() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-callorig.c",
        &[],
        "t0 value=1",
        "t0 value=53",
    )?;
    exe_case(
        Link::Pie,
        "-O2",
        "patched-callorig.c",
        &["3"],
        "t2 value=1",
        "t2 value=53",
    )
}

#[test]
fn patched_code_reads_new_rodata() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-rodata.c",
        &[],
        "msg=hello",
        "msg=patched rodata string",
    )
}

#[test]
fn patched_code_calls_into_glibc() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-glibc.c",
        &[],
        "value=1",
        "value=77",
    )
}

#[test]
fn patched_code_references_glibc_stderr() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-stderr.c",
        &[],
        "value=1",
        "value=42",
    )
}

#[test]
fn patched_code_calls_ifunc_memcpy_and_strlen() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-ifunc.c",
        &[],
        "value=1",
        "value=112",
    )
}

#[test]
fn patched_code_reads_executable_tls_variable() -> Result<()> {
    exe_case(
        Link::Pie,
        "-O2",
        "patched-tls.c",
        &["2"],
        "t1 value=1",
        "t1 value=42",
    )
}
