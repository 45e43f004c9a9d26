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

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);

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

/// Issue 18.12: new variables go to `.kpatch.data`, a progbits section that starts a
/// page of its own in the patch file after all patch code (LibcarePlus makes what
/// precedes its file offset read+exec, and writing a variable there faulted).
#[test]
fn new_variables_are_in_a_writable_page_of_their_own_after_the_code() -> Result<()> {
    const SHF_WRITE: u64 = 1;
    const SHF_ALLOC: u64 = 2;
    const SHF_EXECINSTR: u64 = 4;
    let s = Scratch::new()?;
    let b = builder(&s, "scenario-exe", Link::Pie, "-O2")?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-newvar.c", "0001")?;
    let bytes = std::fs::read(&patch.path)?;
    let pf = kpatch_file::PatchFile::parse(&bytes)?;
    let view = pf.elf_view();
    let data = view
        .section_by_name(".kpatch.data")
        .expect("the patch has a .kpatch.data section");
    assert!(
        data.addralign >= 4096 && data.offset % 4096 == 0,
        ".kpatch.data at file offset {:#x}, alignment {}",
        data.offset,
        data.addralign
    );
    for sec in view.sections() {
        let name = sec.name_str();
        if sec.flags & SHF_ALLOC == 0 || !name.starts_with(".kpatch") {
            continue;
        }
        if sec.flags & SHF_EXECINSTR != 0 {
            assert!(
                sec.offset + sec.size <= data.offset,
                "{name} after the data"
            );
        }
        if sec.flags & SHF_WRITE != 0 {
            assert!(sec.offset >= data.offset, "{name} before .kpatch.data");
            assert!(!sec.is_nobits(), "{name} is NOBITS");
        }
    }
    round_trip(&exe, &[], &patch.path, "value=1", "value=42")
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

/// The library scenario: libscen.so + the executable using it.
fn lib_setup(s: &Scratch) -> Result<(Builder, Object, Object)> {
    let b = builder(s, "scenario-lib", Link::Pie, "-O2")?;
    let lib = b.library("lib.c", "scen")?;
    let exe = b.executable("orig.c", "libprog", &[&lib])?;
    Ok((b, lib, exe))
}

#[test]
fn patch_a_shared_library_function() -> Result<()> {
    let s = Scratch::new()?;
    let (b, lib, exe) = lib_setup(&s)?;
    let patch = b.patch(&lib, "lib-patched.c", "0001")?;
    round_trip(&exe, &[], &patch.path, "exe=1 lib=1", "exe=1 lib=2")
}

#[test]
fn library_patch_calls_glibc() -> Result<()> {
    let s = Scratch::new()?;
    let (b, lib, exe) = lib_setup(&s)?;
    let patch = b.patch(&lib, "lib-glibc.c", "0001")?;
    round_trip(&exe, &[], &patch.path, "exe=1 lib=1", "exe=1 lib=33")
}

#[test]
fn library_patch_reads_initial_exec_library_tls_variable() -> Result<()> {
    let s = Scratch::new()?;
    // Initial-exec TLS: the library's GOT holds the variable's offset, which the
    // patch's GOTTPOFF slot copies. (The default general-dynamic model is covered by
    // `library_patch_reads_library_tls_variable` in scenarios.rs.)
    let flags = Flags {
        opt: "-O2".into(),
        force_gotpcrel: true,
        extra: vec!["-ftls-model=initial-exec".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-lib"),
        s.path(),
        flags,
    )?;
    let lib = b.library("lib.c", "scen")?;
    let exe = b.executable("orig.c", "libprog", &[&lib])?;
    let patch = b.patch(&lib, "lib-tls.c", "0001")?;
    round_trip(&exe, &[], &patch.path, "exe=1 lib=1", "exe=1 lib=18")
}

#[test]
fn library_patch_reads_static_initial_exec_tls_variable_of_the_library() -> Result<()> {
    let s = Scratch::new()?;
    // A `static __thread` variable reached initial-exec: the library's GOT slot for it
    // has a TPOFF64 relocation without a symbol (issue 18.3), found by its offset.
    let flags = Flags {
        opt: "-O2".into(),
        force_gotpcrel: true,
        extra: vec!["-ftls-model=initial-exec".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-lib"),
        s.path(),
        flags,
    )?;
    let lib = b.library("lib-static-tls.c", "scen")?;
    let exe = b.executable("orig.c", "libprog", &[&lib])?;
    let patch = b.patch(&lib, "lib-static-tls-patched.c", "0001")?;
    round_trip(&exe, &[], &patch.path, "exe=1 lib=1", "exe=1 lib=42")
}

/// Issue 18 (format interop): LibCare's and LibcarePlus' kpatch_strip leave a library
/// patch's access to a `static __thread` variable as `R_X86_64_GOTTPOFF` against the
/// variable, with the library's own TPOFF64 GOT slot offset as the addend (their
/// appliers add the load base and subtract 4). livecare took that addend for a pc bias
/// and pointed the load 16 KiB past its slot: the target died of SIGSEGV on its first
/// call (their suites' `tls_shared`). The patch of the test above, rewritten to that
/// form, must apply, run and unpatch.
#[test]
fn library_patch_in_libcare_form_reads_static_tls_variable_of_the_library() -> Result<()> {
    let s = Scratch::new()?;
    let flags = Flags {
        opt: "-O2".into(),
        force_gotpcrel: true,
        extra: vec!["-ftls-model=initial-exec".into()],
        ..Flags::default()
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-lib"),
        s.path(),
        flags,
    )?;
    let lib = b.library("lib-static-tls.c", "scen")?;
    let exe = b.executable("orig.c", "libprog", &[&lib])?;
    let patch = b.patch(&lib, "lib-static-tls-patched.c", "0001")?;
    let forged = s.join("libcare-form.kpatch");
    std::fs::write(&forged, libcare_gottpoff(&patch.path, &lib.path, b"lib_s")?)?;
    round_trip(&exe, &[], &forged, "exe=1 lib=1", "exe=1 lib=42")
}

/// `patch` with its load of `var`'s TLS offset (our form: `PC32` against the library's
/// `.got` reaching the TPOFF64 slot without a symbol) rewritten the way LibCare's
/// kpatch_strip writes it: `GOTTPOFF` against `var`, addend = the slot's offset in the
/// library. The CRC is recomputed (LibcarePlus layout, ours: at 144).
fn libcare_gottpoff(patch: &Path, lib: &Path, var: &[u8]) -> Result<Vec<u8>> {
    use anyhow::{ensure, Context};
    use object::{Object as _, ObjectSection as _};
    let ldata = std::fs::read(lib)?;
    let lf = object::File::parse(&*ldata)?;
    let got = lf
        .section_by_name(".got")
        .context("library .got")?
        .address();
    let rela = lf
        .section_by_name(".rela.dyn")
        .context("library .rela.dyn")?;
    let rd = rela.data()?;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    // The variable is local: its slot's TPOFF64 (18) names symbol 0.
    let slots: Vec<u64> = (0..rd.len() / 24)
        .map(|k| (u64_at(rd, k * 24), u64_at(rd, k * 24 + 8)))
        .filter(|&(_, info)| info == 18)
        .map(|(off, _)| off)
        .collect();
    ensure!(slots.len() == 1, "TPOFF64 slots without symbol: {slots:x?}");
    let slot = slots[0];

    let mut b = std::fs::read(patch)?;
    let pf = kpatch_file::PatchFile::parse(&b)?;
    let view = pf.elf_view();
    let elf = pf.header().kpatch_offset as usize;
    let total = pf.header().total_size as usize;
    let syms = &view.symtab().context("symtab")?.symbols;
    let var_sym = syms
        .iter()
        .find(|s| s.name == var)
        .context("variable symbol")?
        .index as u64;
    let got_sec = view.section_by_name(".got").context("patch .got")?.index;
    let got_sym = syms
        .iter()
        .find(|s| s.shndx as usize == got_sec && s.info & 0xf == 3)
        .context(".got section symbol")?
        .index as u32;
    let text = view
        .section_by_name(".kpatch.text")
        .context(".kpatch.text")?
        .index;
    let rel = view
        .relocation_sections()
        .iter()
        .find(|r| r.target == text)
        .context(".rela.kpatch.text")?;
    let k = rel
        .entries
        .iter()
        .position(|r| r.r_type == 2 && r.sym == got_sym && got as i64 + r.addend + 4 == slot as i64)
        .context("the PC32 load of the variable's slot")?;
    let at = elf + view.section(rel.section).context("rela")?.offset as usize + k * 24;
    // R_X86_64_GOTTPOFF (22) against the variable, addend = the slot's offset.
    b[at + 8..at + 16].copy_from_slice(&((var_sym << 32) | 22).to_le_bytes());
    b[at + 16..at + 24].copy_from_slice(&(slot as i64).to_le_bytes());
    let crc = kpatch_file::crc32(&b[elf..total]);
    b[144..148].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

#[test]
fn library_patch_calls_an_ifunc_of_the_library_itself() -> Result<()> {
    let s = Scratch::new()?;
    // livecare maps the library's file to read it but never loads it: the resolver
    // must not be run from that mapping (issue 18.2: livecare died of SIGSEGV).
    let b = builder(&s, "scenario-lib-ifunc", Link::Pie, "-O2")?;
    let lib = b.library("lib.c", "ifn")?;
    let exe = b.executable("orig.c", "ifnprog", &[&lib])?;
    let patch = b.patch(&lib, "lib-patched.c", "0001")?;
    round_trip(&exe, &[], &patch.path, "lib=1", "lib=42")
}

/// A directory with `<buildid>.kpatch` for the executable and the library.
fn exe_and_lib_dir(s: &Scratch) -> Result<(Object, std::path::PathBuf)> {
    let (b, lib, exe) = lib_setup(s)?;
    let pl = b.patch(&lib, "lib-patched.c", "0001")?;
    let pe = b.patch(&exe, "patched.c", "0001")?;
    let dir = s.join("patches");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&pl.path, dir.join(format!("{}.kpatch", lib.build_id)))?;
    std::fs::copy(&pe.path, dir.join(format!("{}.kpatch", exe.build_id)))?;
    Ok((exe, dir))
}

#[test]
fn patch_directory_patches_executable_and_library_together() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, dir) = exe_and_lib_dir(&s)?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("exe=1 lib=1", WAIT)?;
    let pid = p.pid().to_string();
    let out = ok(&lc(&["patch", "-p", &pid, path(&dir)]))?;
    assert_eq!(out.matches("patched 1 function").count(), 2, "{out}");
    p.drain();
    p.wait_for("exe=2 lib=2", WAIT)?;
    // LIFO: the most recent first, then the other.
    ok(&lc(&["unpatch", "-p", &pid]))?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    p.drain();
    p.wait_for("exe=1 lib=1", WAIT)?;
    let none = lc(&["unpatch", "-p", &pid]);
    assert_eq!(none.status.code(), Some(1));
    Ok(())
}

#[test]
fn run_patches_a_program_at_start() -> Result<()> {
    let s = Scratch::new()?;
    let (exe, dir) = exe_and_lib_dir(&s)?;
    let mut cmd = std::process::Command::new(livecare());
    cmd.args(["run", "-P", path(&dir), "--", path(&exe.path)]);
    let mut p = Running::spawn(cmd)?;
    // The very first report line is already patched.
    let first = p.wait_for("exe=", WAIT)?;
    assert_eq!(first, "exe=2 lib=2");
    p.wait_for("exe=2 lib=2", WAIT)?;
    Ok(())
}

#[test]
fn two_stacked_patches_on_one_function_unpatch_last_in_first_out() -> Result<()> {
    let s = Scratch::new()?;
    let b = builder(&s, "scenario-exe", Link::Pie, "-O2")?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let p1 = b.patch(&exe, "patched-basic.c", "0001")?;
    let p2 = b.patch(&exe, "patched-stack2.c", "0002")?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, path(&p1.path)]))?;
    p.drain();
    p.wait_for("value=2", WAIT)?;
    ok(&lc(&["patch", "-p", &pid, path(&p2.path)]))?;
    p.drain();
    p.wait_for("value=3", WAIT)?;
    let wrong = lc(&["unpatch", "-p", &pid, "-i", "0001"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("patch 0002 must be removed before patch 0001"),
        "{}",
        stderr(&wrong)
    );
    p.drain();
    p.wait_for("value=3", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid, "-i", "0002"]))?;
    p.drain();
    p.wait_for("value=2", WAIT)?;
    ok(&lc(&["unpatch", "-p", &pid]))?;
    p.drain();
    p.wait_for("value=1", WAIT)?;
    assert!(p.is_alive());
    Ok(())
}

#[test]
fn patch_level_two_replaces_level_one() -> Result<()> {
    let s = Scratch::new()?;
    let b = builder(&s, "scenario-exe", Link::Pie, "-O2")?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let p1: Patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let p2: Patch = b.patch(&exe, "patched-stack2.c", "0002")?;
    let storage = s.join("storage");
    let lvl = |n: u32, p: &Patch| -> Result<()> {
        let d = storage.join(&exe.build_id).join(n.to_string());
        std::fs::create_dir_all(&d)?;
        std::fs::copy(&p.path, d.join("kpatch.bin"))?;
        Ok(())
    };
    lvl(1, &p1)?;
    let mut p = Running::start(&exe.path, &[])?;
    p.wait_for("value=1", WAIT)?;
    let pid = p.pid().to_string();
    ok(&lc(&["patch", "-p", &pid, path(&storage)]))?;
    p.drain();
    p.wait_for("value=2", WAIT)?;
    lvl(2, &p2)?;
    ok(&lc(&["patch", "-p", &pid, path(&storage)]))?;
    p.drain();
    p.wait_for("value=3", WAIT)?;
    let info = ok(&lc(&["info", "-p", &pid]))?;
    assert!(
        info.contains("1 patch(es)") && info.contains("patch 0002"),
        "{info}"
    );
    ok(&lc(&["unpatch", "-p", &pid]))?;
    p.drain();
    p.wait_for("value=1", WAIT)?;
    Ok(())
}

#[test]
fn patch_all_processes_patches_every_matching_one() -> Result<()> {
    let s = Scratch::new()?;
    // -O1: a build-id no other (parallel) test uses, so `-p all` touches only ours.
    let b = builder(&s, "scenario-exe", Link::Pie, "-O1")?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let mut a = Running::start(&exe.path, &[])?;
    let mut c = Running::start(&exe.path, &[])?;
    a.wait_for("value=1", WAIT)?;
    c.wait_for("value=1", WAIT)?;
    let out = ok(&lc(&["patch", "-p", "all", path(&patch.path)]))?;
    for r in [&a, &c] {
        assert!(out.contains(&format!("in pid {} ", r.pid())), "{out}");
    }
    a.drain();
    c.drain();
    a.wait_for("value=2", WAIT)?;
    c.wait_for("value=2", WAIT)?;
    let info = ok(&lc(&["info", "-p", "all", "-b", &exe.build_id]))?;
    assert!(
        info.contains(&format!("pid {}", a.pid())) && info.contains(&format!("pid {}", c.pid())),
        "{info}"
    );
    ok(&lc(&["unpatch", "-p", "all", &exe.build_id]))?;
    a.drain();
    c.drain();
    a.wait_for("value=1", WAIT)?;
    c.wait_for("value=1", WAIT)?;
    let _ = MemorySnapshot::take(a.pid())?;
    Ok(())
}

#[test]
fn patch_and_unpatch_all_with_parallel_jobs_change_every_matching_process_once() -> Result<()> {
    let s = Scratch::new()?;
    // A define no other test uses gives this build its own build-id, so `-p all`
    // touches only these processes.
    let flags = Flags {
        exe_link: Link::Pie,
        opt: "-O2".into(),
        force_gotpcrel: true,
        extra: vec!["-DLIVECARE_PARALLEL_JOBS_TEST=1".into()],
    };
    let b = Builder::new(
        &livecare(),
        &testkit::fixture_dir("scenario-exe"),
        s.path(),
        flags,
    )?;
    let exe = b.executable("orig.c", "prog", &[])?;
    let patch = b.patch(&exe, "patched-basic.c", "0001")?;
    let mut procs = Vec::new();
    for _ in 0..4 {
        let mut p = Running::start(&exe.path, &[])?;
        p.wait_for("value=1", WAIT)?;
        procs.push(p);
    }
    let out = ok(&lc(&[
        "patch",
        "-p",
        "all",
        "--jobs",
        "3",
        path(&patch.path),
    ]))?;
    for p in &mut procs {
        assert_eq!(
            out.matches(&format!("in pid {} ", p.pid())).count(),
            1,
            "pid {} not patched exactly once:\n{out}",
            p.pid()
        );
        p.drain();
        p.wait_for("value=2", WAIT)?;
        let (state, tracer) = p.proc_state()?;
        assert!(tracer == 0 && !state.starts_with('t'), "{state} {tracer}");
    }
    let out = ok(&lc(&["unpatch", "-p", "all", "--jobs", "3", &exe.build_id]))?;
    for p in &mut procs {
        assert_eq!(
            out.matches(&format!("from pid {} ", p.pid())).count(),
            1,
            "pid {} not unpatched exactly once:\n{out}",
            p.pid()
        );
        p.drain();
        p.wait_for("value=1", WAIT)?;
        let (state, tracer) = p.proc_state()?;
        assert!(tracer == 0 && !state.starts_with('t'), "{state} {tracer}");
    }
    Ok(())
}
