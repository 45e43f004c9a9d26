//! Mismatched and hostile patch files that livecare once accepted, each breaking the
//! target (issue 16, items 3, 6, 8 and 11), against a real gcc-built target
//! (tests/fixtures/forged-data). Every one must be refused with exit 1 and an error that
//! names what is wrong, the target left running, unchanged and untraced; the genuine
//! patch still applies.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use common::{lc, livecare, stderr, stdout};
use kpatch_file::PatchFile;
use testkit::patchbuild::{Builder, Flags, Patch};
use testkit::{fixture_dir, MemorySnapshot, Running, Scratch, Seen};

/// Generous for a loaded CI machine: a wait only lasts this long on failure.
const WAIT: Duration = Duration::from_secs(20);
const BEFORE: &str = "value=1 other=5";
const AFTER: &str = "value=2 other=6";

/// The target built from orig.c and its genuine two-hunk patch (patched.c).
struct Built {
    _dir: Scratch,
    builder: Builder,
    exe: testkit::patchbuild::Object,
    patch: Patch,
}

fn build() -> Result<Built> {
    let dir = Scratch::new()?;
    let builder = Builder::new(
        &livecare(),
        &fixture_dir("forged-data"),
        &dir.join("build"),
        Flags::default(),
    )?;
    let exe = builder.executable("orig.c", "prog", &[])?;
    let patch = builder.patch(&exe, "patched.c", "0001")?;
    Ok(Built {
        _dir: dir,
        builder,
        exe,
        patch,
    })
}

impl Built {
    fn start(&self) -> Result<Running> {
        let mut p = Running::start(&self.exe.path, &[])?;
        p.wait_for(BEFORE, WAIT)?;
        Ok(p)
    }

    fn work(&self, name: &str) -> PathBuf {
        self._dir.join(name)
    }
}

/// The target is alive, prints its original output, and no thread is stopped or traced.
fn assert_untouched(p: &mut Running, base: &MemorySnapshot) -> Result<()> {
    ensure!(p.is_alive(), "target died; last lines {:?}", p.tail(5));
    let (state, tracer) = p.proc_state()?;
    ensure!(
        tracer == 0 && !state.starts_with('t') && !state.starts_with('T'),
        "target left {state}, traced by {tracer}"
    );
    MemorySnapshot::take(p.pid())?
        .assert_same(base)
        .context("target changed by a refused patch")?;
    p.drain();
    let line = p.wait_for("value=", WAIT)?;
    ensure!(line == BEFORE, "target prints {line:?}, want {BEFORE:?}");
    Ok(())
}

/// `livecare patch -p PID file` must fail with exit 1, every one of `want` in its
/// message, and the target untouched. Returns stderr.
fn refused(p: &mut Running, file: &Path, want: &[&str]) -> Result<String> {
    let base = MemorySnapshot::take(p.pid())?;
    let pid = p.pid().to_string();
    let o = lc(&["patch", "-p", &pid, &file.to_string_lossy()]);
    let err = stderr(&o);
    ensure!(
        o.status.code() == Some(1),
        "patch of {} exited {:?}, want 1 (refused)\nstdout:\n{}\nstderr:\n{err}",
        file.display(),
        o.status,
        stdout(&o)
    );
    for w in want {
        ensure!(err.contains(w), "error lacks {w:?}: {err}");
    }
    assert_untouched(p, &base)?;
    Ok(err)
}

/// The genuine patch applies (the new code runs) and unpatches.
fn applies(p: &mut Running, file: &Path) -> Result<()> {
    let pid = p.pid().to_string();
    common::ok(&lc(&["patch", "-p", &pid, &file.to_string_lossy()]))?;
    p.drain();
    p.settle(3, WAIT, |l| {
        Ok(match l {
            AFTER => Seen::Final,
            BEFORE => Seen::Transitional,
            l => bail!("unexpected output {l:?}"),
        })
    })
    .context("after patch")?;
    common::ok(&lc(&["unpatch", "-p", &pid]))?;
    p.drain();
    p.settle(3, WAIT, |l| {
        Ok(match l {
            BEFORE => Seen::Final,
            AFTER => Seen::Transitional,
            l => bail!("unexpected output {l:?}"),
        })
    })
    .context("after unpatch")?;
    Ok(())
}

/// The container with its ELF edited by `f(bytes, elf_offset, view)` and the CRC-32
/// recomputed, so the edit reaches the checks behind the checksum.
fn edited(path: &Path, f: impl FnOnce(&mut Vec<u8>, usize, &kpatch_file::ElfView)) -> Vec<u8> {
    let original = std::fs::read(path).expect("patch file");
    let pf = PatchFile::parse(&original).expect("the genuine patch parses");
    let mut b = original.clone();
    let elf = pf.header().kpatch_offset as usize;
    f(&mut b, elf, pf.elf_view());
    // LibcarePlus layout (what `livecare make` writes): csum at 144.
    let total = pf.header().total_size as usize;
    let crc = kpatch_file::crc32(&b[elf..total]);
    b[144..148].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Replaces `from` by `to` (same length) inside section `name`.
fn replace_in(
    b: &mut [u8],
    elf: usize,
    view: &kpatch_file::ElfView,
    name: &str,
    from: &[u8],
    to: &[u8],
) {
    assert_eq!(from.len(), to.len());
    let s = view.section_by_name(name).expect("section");
    let start = elf + s.offset as usize;
    let data = &mut b[start..start + s.size as usize];
    let at = data
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("{from:?} not in {name}"));
    data[at..at + to.len()].copy_from_slice(to);
}

/// Item 6: a patch built from another binary (same code, `table` elsewhere in `.data`)
/// stamped with the target's build-id applied with exit 0 and read the wrong data
/// (`value=8` instead of 2). Every symbol the patch places in the target's sections is
/// now checked against the target's symbol of that name.
#[test]
fn a_patch_from_another_binary_with_a_forged_build_id_is_refused() -> Result<()> {
    let built = build()?;
    let other_builder = Builder::new(
        &livecare(),
        &fixture_dir("forged-data"),
        &built.work("other"),
        Flags::default(),
    )?;
    let other = other_builder.executable("other.c", "prog", &[])?;
    ensure!(
        other.build_id != built.exe.build_id,
        "two distinct binaries"
    );
    let other_patch = other_builder.patch(&other, "other-patched.c", "0001")?;
    let forged = built.work("forged.kpatch");
    built
        .builder
        .make(&other_patch.elf, &built.exe.build_id, "0001", &forged)?;

    let mut p = built.start()?;
    let err = refused(
        &mut p,
        &forged,
        &["symbol table", ".data+", "another binary"],
    )?;
    eprintln!("forged build-id: {err}");
    // The check must not refuse the genuine patch.
    applies(&mut p, &built.patch.path)
}

/// Item 3: two `.kpatch.info` records for one function with different bodies were
/// accepted (the second body won) and the patch could never be removed again. Record
/// `other` is made to replace `value` too: same symbol, name and length.
#[test]
fn two_records_replacing_one_function_are_refused() -> Result<()> {
    let built = build()?;
    let bytes = edited(&built.patch.path, |b, elf, view| {
        let info = view.section_by_name(".kpatch.info").unwrap();
        let rel = view
            .relocation_sections()
            .iter()
            .find(|r| r.target == info.index)
            .unwrap();
        let rel_off = elf + view.section(rel.section).unwrap().offset as usize;
        let sym_name = |k: usize| {
            let e = &rel.entries[k];
            view.reloc_symbol(rel, e).unwrap().name_str().into_owned()
        };
        // Entries by record (offset / 48) and field (offset % 48: 0 daddr, 24 symstr).
        let entry = |rec: u64, field: u64| {
            rel.entries
                .iter()
                .position(|e| e.offset == rec * 48 + field)
                .unwrap()
        };
        let (v, o) = if sym_name(entry(0, 0)) == "value" {
            (0, 1)
        } else {
            (1, 0)
        };
        assert_eq!(sym_name(entry(o, 0)), "other");
        // daddr: same symbol and addend; symstr: same name; dlen: same length.
        for field in [0u64, 24] {
            let (from, to) = (entry(v, field), entry(o, field));
            let src = rel_off + from * 24;
            let dst = rel_off + to * 24;
            let info_and_addend = b[src + 8..src + 24].to_vec();
            b[dst + 8..dst + 24].copy_from_slice(&info_and_addend);
        }
        let rec = elf + info.offset as usize;
        let dlen = b[rec + v as usize * 48 + 16..rec + v as usize * 48 + 20].to_vec();
        b[rec + o as usize * 48 + 16..rec + o as usize * 48 + 20].copy_from_slice(&dlen);
    });
    let file = built.work("twice.kpatch");
    std::fs::write(&file, bytes)?;
    let inspect = lc(&["inspect", &file.to_string_lossy()]);
    ensure!(
        inspect.status.code() == Some(1) && stderr(&inspect).contains(".kpatch.info[1].daddr"),
        "inspect accepted it: {:?}\n{}{}",
        inspect.status,
        stdout(&inspect),
        stderr(&inspect)
    );
    let mut p = built.start()?;
    let err = refused(&mut p, &file, &[".kpatch.info", "once"])?;
    eprintln!("two records for value(): {err}");
    Ok(())
}

/// Item 11: escape sequences in a patch's names reached the terminal raw, in `patch`
/// errors and in `inspect`.
#[test]
fn names_with_escape_sequences_are_printed_escaped() -> Result<()> {
    let built = build()?;
    let mut p = built.start()?;
    // The function name in .kpatch.strtab ("value"): refused by verification, which
    // names the function; a symbol name in .strtab ("table"): refused as unknown.
    for (what, section, from, to, shown) in [
        (
            "function name",
            ".kpatch.strtab",
            &b"value\0"[..],
            &b"\x1b[31m\0"[..],
            "\\x1b[31m",
        ),
        (
            "symbol name",
            ".strtab",
            &b"table\0"[..],
            &b"\x1b]0;X\0"[..],
            "\\x1b]0;X",
        ),
    ] {
        let bytes = edited(&built.patch.path, |b, elf, view| {
            replace_in(b, elf, view, section, from, to)
        });
        let file = built.work("escape.kpatch");
        std::fs::write(&file, bytes)?;
        let err = refused(&mut p, &file, &[shown])?;
        ensure!(!err.contains('\x1b'), "{what}: raw escape in {err:?}");
        let o = lc(&["inspect", &file.to_string_lossy()]);
        let out = stdout(&o);
        ensure!(o.status.success(), "{what}: inspect failed: {}", stderr(&o));
        ensure!(
            !out.contains('\x1b'),
            "{what}: raw escape in inspect: {out:?}"
        );
        ensure!(
            out.contains(shown),
            "{what}: {shown} not in inspect:\n{out}"
        );
    }
    Ok(())
}

/// Runs livecare with a deadline; `None` if it had to be killed.
fn run_within(args: &[&str], limit: Duration) -> Result<Option<(Output, Duration)>> {
    let t0 = Instant::now();
    let mut child = Command::new(livecare())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    while child.try_wait()?.is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Some((child.wait_with_output()?, t0.elapsed())))
}

/// Item 8: a huge sparse file was read whole (2.1 GB RSS for 2 GiB; a 20 GiB one was
/// still being read after 40 s) before `total_size` was checked. The size in the header
/// is now checked against the file's before the rest is read.
#[test]
fn a_huge_sparse_patch_file_is_refused_without_reading_it() -> Result<()> {
    let built = build()?;
    let mut p = built.start()?;
    let base = MemorySnapshot::take(p.pid())?;
    let huge = built.work("huge.kpatch");
    std::fs::copy(&built.patch.path, &huge)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)?
        .set_len(20 << 30)?;
    let pid = p.pid().to_string();
    let file = huge.to_string_lossy().into_owned();
    // Reading 20 GiB takes far longer than this even on a fast disk.
    let limit = Duration::from_secs(15);
    for args in [vec!["patch", "-p", &pid, &file], vec!["inspect", &file]] {
        let Some((o, took)) = run_within(&args, limit)? else {
            bail!("livecare {args:?} still running after {limit:?}: it reads the file whole");
        };
        let err = stderr(&o);
        eprintln!("livecare {}: {took:?}: {}", args[0], err.trim());
        ensure!(o.status.code() == Some(1), "{args:?}: {:?} {err}", o.status);
        ensure!(
            err.contains("header.total_size") && err.contains("trailing data"),
            "{args:?}: {err}"
        );
    }
    assert_untouched(&mut p, &base)
}

/// Issues 17 (item 1) and 18 (item 4): `R_X86_64_NONE` entries (symbol 0) in
/// `.rela.eh_frame`, as `ld -q` leaves them on jemalloc's FDEs in redis and as LibCare's
/// and LibcarePlus' patches carry them, were refused at apply ("relocation against
/// unresolved symbol " with an empty name). They change nothing: the patch applies, the
/// new code runs, and unpatch restores the old.
#[test]
fn none_relocations_with_symbol_zero_are_skipped() -> Result<()> {
    let built = build()?;
    let helper = built
        .builder
        .patch(&built.exe, "patched-helper.c", "0002")?;
    let bytes = edited(&helper.path, |b, elf, view| {
        let eh = view.section_by_name(".eh_frame").expect(".eh_frame");
        let rel = view
            .relocation_sections()
            .iter()
            .find(|r| r.target == eh.index)
            .expect(".rela.eh_frame");
        let syms = &view.symtab().expect("symtab").symbols;
        // The patch carries the FDEs of its new code only (value, other and the static
        // helper bump). The hunks' bodies are the `.kpatch.info` saddr targets; the
        // helper's FDE is the one whose pc_begin is no hunk's body.
        let info = view.section_by_name(".kpatch.info").expect(".kpatch.info");
        let target = |r: &kpatch_file::elf::Relocation| {
            syms[r.sym as usize].value.wrapping_add(r.addend as u64)
        };
        let code = syms[rel.entries[0].sym as usize].shndx;
        let bodies: Vec<u64> = view
            .relocation_sections()
            .iter()
            .filter(|r| r.target == info.index)
            .flat_map(|r| r.entries.iter())
            .filter(|r| syms[r.sym as usize].shndx == code)
            .map(target)
            .collect();
        // That entry becomes R_X86_64_NONE against symbol 0, addend 0: its FDE keeps
        // pc_begin 0, as a dropped FDE's does.
        let k = rel
            .entries
            .iter()
            .position(|r| syms[r.sym as usize].shndx == code && !bodies.contains(&target(r)))
            .expect("the relocation of bump's FDE");
        let at = elf + view.section(rel.section).unwrap().offset as usize + k * 24;
        b[at + 8..at + 24].fill(0);
    });
    let file = built.work("none.kpatch");
    std::fs::write(&file, bytes)?;
    let o = lc(&["inspect", &file.to_string_lossy()]);
    ensure!(
        o.status.success(),
        "inspect refused it: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let mut p = built.start()?;
    applies(&mut p, &file)?;
    ensure!(p.is_alive(), "target died; last lines {:?}", p.tail(5));
    Ok(())
}
