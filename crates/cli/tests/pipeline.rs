//! The manual patch pipeline of system.md §1 on a hand-written augmented assembly fixture
//! (tests/fixtures/strip-manual): `gcc -c`, link with `-Wl,-q`, `kpatch_strip --strip`,
//! `strip --strip-unneeded`, `kpatch_strip --rel-fixup`, `kpatch_strip --undo-link`,
//! `kpatch_make`; for a PIE, a non-PIE executable and a shared library.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use object::read::elf::{ElfFile64, FileHeader, SectionHeader};
use object::{
    elf, Endianness, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget,
    SectionIndex,
};
use testkit::{build_id_of, gcc, run_ok, Link, Running, Scratch};

const LIVECARE: &str = env!("CARGO_BIN_EXE_livecare");

/// `kpatch_strip` as LibCare scripts call it: a symlink to the livecare binary.
fn kpatch_strip(dir: &Scratch) -> Result<PathBuf> {
    let link = dir.join("bin").join("kpatch_strip");
    if !link.exists() {
        std::fs::create_dir_all(dir.join("bin"))?;
        std::os::unix::fs::symlink(LIVECARE, &link)?;
    }
    Ok(link)
}

fn run(cmd: &mut Command) -> Result<Output> {
    run_ok(cmd)
}

/// The three shapes of patched object the pipeline must handle.
#[derive(Clone, Copy, Debug)]
enum Variant {
    Pie,
    NoPie,
    Shared,
}

impl Variant {
    fn link(self) -> Link {
        match self {
            Variant::Pie => Link::Pie,
            Variant::NoPie => Link::NoPie,
            Variant::Shared => Link::Shared,
        }
    }
    fn orig_asm(self) -> &'static str {
        match self {
            Variant::Shared => "prog.pic.orig.s",
            _ => "prog.orig.s",
        }
    }
    fn out_name(self) -> &'static str {
        match self {
            Variant::Shared => "libprog.so",
            _ => "prog",
        }
    }
}

/// What the pipeline left behind for one variant.
struct Built {
    dir: Scratch,
    orig: PathBuf,
    /// After `--strip` and `strip --strip-unneeded`.
    stripped: Vec<u8>,
    /// The relocatable patch ELF, as fed to `kpatch_make`.
    patch_elf: PathBuf,
}

/// Order of the middle steps.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Order {
    /// system.md §1.5: strip, `strip --strip-unneeded`, rel-fixup, undo-link.
    StripUnneededFirst,
    /// libcare-patch-make's order: strip, rel-fixup, `strip --strip-unneeded`, undo-link.
    RelFixupFirst,
}

/// Builds the original and the patched object and runs the whole pipeline.
fn pipeline(variant: Variant) -> Result<Built> {
    pipeline_in(variant, Order::StripUnneededFirst)
}

/// [`pipeline`] with the middle steps in `order`.
fn pipeline_in(variant: Variant, order: Order) -> Result<Built> {
    let dir = Scratch::new()?;
    dir.copy_fixture("strip-manual")?;
    let orig_s = dir.join(variant.orig_asm());
    let aug = format!(
        "{}\n{}",
        std::fs::read_to_string(&orig_s)?,
        std::fs::read_to_string(dir.join("kpatch-part.s"))?
    );
    let aug_s = dir.write("prog.kpatch.s", aug)?;

    // The original is built from the plain assembly, the patched object from the
    // augmented one (system.md §1.1-1.2).
    let orig_o = gcc(&[&orig_s], &dir.join("orig.o"), Link::Object, &[])?;
    let aug_o = gcc(&[&aug_s], &dir.join("patched.o"), Link::Object, &[])?;
    let orig = gcc(
        &[&orig_o],
        &dir.join(variant.out_name()),
        variant.link(),
        &[],
    )?;
    let patched = gcc(&[&aug_o], &dir.join("patched"), variant.link(), &["-Wl,-q"])?;

    let tool = kpatch_strip(&dir)?;
    let out = dir.join("patch.o");
    run(Command::new(&tool).arg("--strip").arg(&patched).arg(&out))?;
    if order == Order::RelFixupFirst {
        run(Command::new(&tool).arg("--rel-fixup").arg(&orig).arg(&out))?;
    }
    run(Command::new("strip").arg("--strip-unneeded").arg(&out))?;
    let stripped = std::fs::read(&out)?;
    if order == Order::StripUnneededFirst {
        run(Command::new(&tool).arg("--rel-fixup").arg(&orig).arg(&out))?;
    }
    // The native face does the same job.
    run(Command::new(LIVECARE)
        .args(["strip", "--undo-link"])
        .arg(&orig)
        .arg(&out))?;
    Ok(Built {
        dir,
        orig,
        stripped,
        patch_elf: out,
    })
}

/// `kpatch_make` (native face) wraps the pipeline's ELF; returns the container's path.
fn make_container(built: &Built) -> Result<PathBuf> {
    let build_id = build_id_of(&built.orig)?;
    let container = built.dir.join(format!("{build_id}.kpatch"));
    run(Command::new(LIVECARE)
        .args(["make", "-b", &build_id, "-i", "0001", "-o"])
        .arg(&container)
        .arg(&built.patch_elf))?;
    Ok(container)
}

/// Sections that may carry file bytes in the final patch ELF.
fn may_have_bytes(name: &str) -> bool {
    name.starts_with(".kpatch")
        || name.starts_with(".rela.kpatch")
        || matches!(
            name,
            ".eh_frame" | ".rela.eh_frame" | ".symtab" | ".strtab" | ".shstrtab"
        )
}

fn section_name(file: &ElfFile64<'_, Endianness>, index: SectionIndex) -> Result<String> {
    Ok(file.section_by_index(index)?.name()?.to_string())
}

/// `kpatch_make` output parses as a container holding exactly the pipeline's ELF.
fn check_container(variant: Variant, built: &Built) -> Result<()> {
    let container = make_container(built)?;
    let bytes = std::fs::read(&container)?;
    let patch = kpatch_file::PatchFile::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{variant:?}: container does not parse: {e}"))?;
    ensure!(
        patch.header().build_id().as_str() == build_id_of(&built.orig)?,
        "build-id in the header"
    );
    // The container pads the ELF with zeros to 16 bytes.
    let ours = std::fs::read(&built.patch_elf)?;
    let inner = patch.elf();
    ensure!(
        inner.starts_with(&ours)
            && inner.len() - ours.len() < 16
            && inner[ours.len()..].iter().all(|&b| b == 0),
        "{variant:?}: the container holds the pipeline's ELF ({} vs {} bytes)",
        inner.len(),
        ours.len()
    );

    // `inspect --json` reads the one hunk back: report() -> report.kpatch.
    let out = run(Command::new(LIVECARE)
        .args(["inspect", "--json"])
        .arg(&container))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["header"]["patch_id"], "0001", "{variant:?}");
    let info = json["elf"]["kpatch_info"]
        .as_array()
        .context("kpatch_info array")?;
    assert_eq!(info.len(), 1, "{variant:?}: one hunk: {info:?}");
    assert_eq!(info[0]["daddr_symbol"], "report", "{variant:?}");
    assert_eq!(info[0]["saddr_symbol"], "report.kpatch", "{variant:?}");
    assert_eq!(info[0]["name"], "report", "{variant:?}");
    let orig_bytes = std::fs::read(&built.orig)?;
    let orig = ElfFile64::<Endianness>::parse(&*orig_bytes)?;
    let report = orig
        .symbols()
        .find(|s| s.name() == Ok("report"))
        .context("original has report")?;
    assert_eq!(info[0]["dlen"], report.size(), "{variant:?}: dlen");
    Ok(())
}

/// Checks everything the applier relies on in the patch ELF made for `variant`.
fn check_patch_elf(variant: Variant, built: &Built) -> Result<()> {
    let orig_bytes = std::fs::read(&built.orig)?;
    let inner = std::fs::read(&built.patch_elf)?;
    kpatch_file::ElfView::parse(&inner, 0).map_err(|e| {
        anyhow::anyhow!("{variant:?}: the container's ELF validator refuses it: {e}")
    })?;
    let file = ElfFile64::<Endianness>::parse(&*inner)?;
    let e = file.endian();
    let hdr = file.elf_header();
    assert_eq!(hdr.e_type(e), elf::ET_REL, "{variant:?}: ET_REL");
    assert_eq!(hdr.e_phnum(e), 0, "{variant:?}: no program headers");

    // Only patch sections (and their relocations, the symbol tables and .eh_frame) carry
    // bytes, and all of them are at address 0.
    for s in file.elf_section_table().iter().skip(1) {
        let name = String::from_utf8_lossy(file.elf_section_table().section_name(e, s)?);
        if s.sh_type(e) == elf::SHT_NOBITS {
            continue;
        }
        assert!(
            may_have_bytes(&name),
            "{variant:?}: {name} should be NOBITS"
        );
        assert_eq!(s.sh_addr(e), 0, "{variant:?}: {name} sh_addr");
        if s.sh_type(e) == elf::SHT_RELA || s.sh_type(e) == elf::SHT_REL {
            assert!(
                name.starts_with(".rela.kpatch") || name == ".rela.eh_frame",
                "{variant:?}: live relocation section {name}"
            );
        }
    }
    for name in [
        ".kpatch.text",
        ".kpatch.data",
        ".kpatch.info",
        ".kpatch.strtab",
    ] {
        let s = file
            .section_by_name(name)
            .with_context(|| format!("{variant:?}: no {name}"))?;
        assert!(!s.data()?.is_empty(), "{variant:?}: {name} has bytes");
    }

    // No PLT32 remains anywhere.
    for s in file.sections() {
        for (off, r) in s.relocations() {
            assert_ne!(
                r.flags(),
                RelocationFlags::Elf {
                    r_type: elf::R_X86_64_PLT32
                },
                "{variant:?}: PLT32 left in {} at {off:#x}",
                s.name()?
            );
        }
    }

    // .kpatch.info record 0: daddr -> the original report(), saddr -> report.kpatch.
    let orig = ElfFile64::<Endianness>::parse(&*orig_bytes)?;
    let orig_report = orig
        .symbols()
        .find(|s| s.name() == Ok("report"))
        .context("original has report")?
        .address();
    let info = file
        .section_by_name(".kpatch.info")
        .context(".kpatch.info")?;
    let rels: Vec<_> = info.relocations().collect();
    let (_, daddr) = rels
        .iter()
        .find(|(off, _)| *off == 0)
        .context("relocation for daddr")?;
    assert_eq!(
        daddr.flags(),
        RelocationFlags::Elf {
            r_type: elf::R_X86_64_64
        }
    );
    let RelocationTarget::Symbol(idx) = daddr.target() else {
        panic!("daddr relocation has no symbol")
    };
    let sym = file.symbol_by_index(idx)?;
    let sec_index = sym.section_index().context("daddr symbol is defined")?;
    let sec = file.section_by_index(sec_index)?;
    assert_eq!(sec.name()?, ".text", "{variant:?}: daddr section");
    assert!(
        sym.name()? == "report" || sym.kind() == object::SymbolKind::Section,
        "{variant:?}: daddr symbol {}",
        sym.name()?
    );
    // The placeholder .text carries the original's address; symbol value and addend
    // are relative to it.
    let target = sec.address() + sym.address() + daddr.addend() as u64;
    assert_eq!(
        target, orig_report,
        "{variant:?}: daddr resolves to report()"
    );

    let (_, saddr) = rels
        .iter()
        .find(|(off, _)| *off == 8)
        .context("relocation for saddr")?;
    let RelocationTarget::Symbol(idx) = saddr.target() else {
        panic!("saddr relocation has no symbol")
    };
    let s = file.symbol_by_index(idx)?;
    assert_eq!(s.name()?, "report.kpatch");
    assert_eq!(
        section_name(&file, s.section_index().context("defined")?)?,
        ".kpatch.text"
    );

    // The kept .eh_frame still has an FDE for the patch body, relocatable against it.
    let eh = file.section_by_name(".eh_frame").context(".eh_frame")?;
    let fde = eh.relocations().any(|(_, r)| {
        let RelocationTarget::Symbol(idx) = r.target() else {
            return false;
        };
        r.flags()
            == RelocationFlags::Elf {
                r_type: elf::R_X86_64_PC32,
            }
            && file
                .symbol_by_index(idx)
                .ok()
                .and_then(|s| s.section_index())
                .and_then(|i| section_name(&file, i).ok())
                .as_deref()
                == Some(".kpatch.text")
    });
    assert!(fde, "{variant:?}: no .eh_frame PC32 against .kpatch.text");
    Ok(())
}

/// After `--strip` and `strip --strip-unneeded`, the dropped `.rela*` sections must not
/// have come back as live relocation sections (binutils 2.40).
fn check_stripped(variant: Variant, stripped: &[u8]) -> Result<()> {
    let file = ElfFile64::<Endianness>::parse(stripped)?;
    for s in file.sections() {
        let name = s.name()?;
        let sh_type = file
            .elf_section_table()
            .section(s.index())?
            .sh_type(file.endian());
        if sh_type == elf::SHT_RELA {
            assert!(
                name.starts_with(".rela.kpatch") || name == ".rela.eh_frame",
                "{variant:?}: strip --strip-unneeded revived {name}"
            );
        }
        if !may_have_bytes(name) && sh_type != elf::SHT_NULL {
            assert_eq!(sh_type, elf::SHT_NOBITS, "{variant:?}: {name} kept bytes");
        }
    }
    Ok(())
}

fn full_check(variant: Variant) -> Result<()> {
    let built = pipeline(variant)?;
    check_stripped(variant, &built.stripped)?;
    check_patch_elf(variant, &built)?;
    // File offsets shrank: the stripped file is a fraction of the linked binary.
    let linked = std::fs::metadata(built.dir.join("patched"))?.len();
    assert!(
        (built.stripped.len() as u64) < linked / 2,
        "{variant:?}: stripped {} bytes vs linked {linked}",
        built.stripped.len()
    );
    Ok(())
}

#[test]
fn manual_pipeline_makes_a_valid_patch_for_a_pie() -> Result<()> {
    full_check(Variant::Pie)
}

#[test]
fn manual_pipeline_makes_a_valid_patch_for_a_non_pie_executable() -> Result<()> {
    full_check(Variant::NoPie)
}

#[test]
fn manual_pipeline_makes_a_valid_patch_for_a_shared_library() -> Result<()> {
    full_check(Variant::Shared)
}

#[test]
fn kpatch_make_wraps_the_pipeline_output_into_a_valid_container() -> Result<()> {
    for variant in [Variant::Pie, Variant::NoPie, Variant::Shared] {
        let built = pipeline(variant)?;
        check_container(variant, &built)?;
    }
    Ok(())
}

#[test]
fn rel_fixup_works_while_the_original_is_running() -> Result<()> {
    let dir = Scratch::new()?;
    dir.copy_fixture("strip-manual")?;
    let orig_s = dir.join("prog.orig.s");
    let aug = format!(
        "{}\n{}",
        std::fs::read_to_string(&orig_s)?,
        std::fs::read_to_string(dir.join("kpatch-part.s"))?
    );
    let aug_s = dir.write("prog.kpatch.s", aug)?;
    let orig = gcc(&[&orig_s], &dir.join("prog"), Link::Pie, &[])?;
    let patched = gcc(&[&aug_s], &dir.join("patched"), Link::Pie, &["-Wl,-q"])?;
    let mut running = Running::start(&orig, &[])?;
    running.wait_for("report 0: original", Duration::from_secs(10))?;

    // Opening a running executable for writing fails with ETXTBSY.
    let busy = std::fs::OpenOptions::new().write(true).open(&orig);
    assert_eq!(busy.err().and_then(|e| e.raw_os_error()), Some(ETXTBSY));

    let tool = kpatch_strip(&dir)?;
    let out = dir.join("patch.o");
    run(Command::new(&tool).arg("--strip").arg(&patched).arg(&out))?;
    run(Command::new(&tool).arg("--rel-fixup").arg(&orig).arg(&out))?;
    run(Command::new(&tool).arg("--undo-link").arg(&orig).arg(&out))?;
    assert!(running.is_alive(), "the original kept running");
    let bytes = std::fs::read(&out)?;
    let file = ElfFile64::<Endianness>::parse(&*bytes)?;
    assert_eq!(file.elf_header().e_type(file.endian()), elf::ET_REL);
    Ok(())
}

/// `ETXTBSY` ("Text file busy") on Linux.
const ETXTBSY: i32 = 26;

#[test]
fn kpatch_strip_requires_exactly_one_mode() -> Result<()> {
    let dir = Scratch::new()?;
    let tool = kpatch_strip(&dir)?;
    let a = dir.write("a", b"x")?;
    let none = Command::new(&tool).output()?;
    assert_eq!(none.status.code(), Some(2), "no mode is a usage error");
    let two = Command::new(&tool)
        .arg("--strip")
        .args([&a, &a])
        .arg("--undo-link")
        .args([&a, &a])
        .output()?;
    assert_eq!(two.status.code(), Some(2), "two modes are a usage error");
    Ok(())
}

#[test]
fn kpatch_strip_reports_a_bad_input_and_leaves_no_output() -> Result<()> {
    let dir = Scratch::new()?;
    let tool = kpatch_strip(&dir)?;
    let bad = dir.write("bad", b"not an ELF file")?;
    let out = dir.join("out");
    let res = Command::new(&tool)
        .arg("--strip")
        .arg(&bad)
        .arg(&out)
        .output()?;
    assert_eq!(res.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("bad"),
        "{stderr}"
    );
    assert!(!Path::new(&out).exists(), "no partial output");
    Ok(())
}

/// Where a relocation lands, independent of how a tool spelled it: an import by name,
/// or a section name plus offset (symbol value + addend; section symbols count as 0,
/// since LibCare leaves link-time garbage in their values).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
enum Landing {
    Import(String),
    Section(String, i64),
}

/// The relocations of section `name`, keyed by offset: (normalised type, landing).
/// A GOT-relative reference in front of a `lea` is a plain `PC32`, whoever rewrote it.
fn landings(data: &[u8], name: &str) -> Result<std::collections::BTreeMap<u64, (u32, Landing)>> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    let sec = file.section_by_name(name).context(name.to_string())?;
    let code = sec.data()?;
    let mut out = std::collections::BTreeMap::new();
    for (off, r) in sec.relocations() {
        let RelocationFlags::Elf { mut r_type } = r.flags() else {
            anyhow::bail!("not ELF")
        };
        let lea = off >= 2 && code.get(off as usize - 2) == Some(&0x8d);
        if lea
            && matches!(
                r_type,
                elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX
            )
        {
            r_type = elf::R_X86_64_PC32;
        }
        let RelocationTarget::Symbol(idx) = r.target() else {
            anyhow::bail!("relocation at {off:#x} has no symbol")
        };
        let sym = file.symbol_by_index(idx)?;
        let landing = match sym.section_index() {
            None => Landing::Import(
                sym.name()?
                    .split('@')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            Some(i) => {
                let value = if sym.kind() == object::SymbolKind::Section {
                    0
                } else {
                    sym.address() as i64
                };
                Landing::Section(section_name(&file, i)?, value + r.addend())
            }
        };
        out.insert(off, (r_type, landing));
    }
    Ok(out)
}

fn section_bytes(data: &[u8], name: &str) -> Result<Vec<u8>> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    Ok(file
        .section_by_name(name)
        .context(name.to_string())?
        .data()?
        .to_vec())
}

#[test]
fn pipeline_output_matches_the_libcare_patches_of_the_interop_vector() -> Result<()> {
    let Some(interop) = testkit::interop_dir() else {
        testkit::skip_banner(testkit::INTEROP);
        return Ok(());
    };
    let dir = Scratch::new()?;
    dir.copy_fixture("strip-interop")?;
    std::fs::copy(interop.join("foo.c"), dir.join("foo.c"))?;
    let orig = dir.join("foo");
    std::fs::copy(interop.join("foo"), &orig)?;

    // The original stage, as LibCare ran it: gcc -S, then the .s is what got built.
    run(Command::new("gcc")
        .current_dir(dir.path())
        .args(["-O0", "-S", "foo.c", "-o", "foo.s"]))?;
    let rebuilt = gcc(
        &[&dir.join("foo.s")],
        &dir.join("foo.rebuilt"),
        Link::Pie,
        &[],
    )?;
    assert_eq!(
        build_id_of(&rebuilt)?,
        build_id_of(&orig)?,
        "this toolchain rebuilds the interop foo bit for bit"
    );
    let aug = format!(
        "{}\n{}",
        std::fs::read_to_string(dir.join("foo.s"))?,
        std::fs::read_to_string(dir.join("kpatch-part.s"))?
    );
    let aug_s = dir.write("foo.kpatch.s", aug)?;
    let patched = gcc(&[&aug_s], &dir.join("patched"), Link::Pie, &["-Wl,-q"])?;
    let tool = kpatch_strip(&dir)?;
    let out = dir.join("patch.o");
    run(Command::new(&tool).arg("--strip").arg(&patched).arg(&out))?;
    run(Command::new("strip").arg("--strip-unneeded").arg(&out))?;
    run(Command::new(&tool).arg("--rel-fixup").arg(&orig).arg(&out))?;
    run(Command::new(&tool).arg("--undo-link").arg(&orig).arg(&out))?;
    let ours = std::fs::read(&out)?;

    for peer in ["foo.libcare.kpatch", "foo.libcareplus.kpatch"] {
        let bytes = std::fs::read(interop.join(peer))?;
        let theirs = kpatch_file::PatchFile::parse(&bytes)
            .map_err(|e| anyhow::anyhow!("{peer}: {e}"))?
            .elf()
            .to_vec();
        for sec in [".kpatch.text", ".kpatch.info"] {
            let (a, b) = (landings(&ours, sec)?, landings(&theirs, sec)?);
            assert_eq!(a, b, "{peer}: relocations of {sec}");
        }
        assert_eq!(
            section_bytes(&ours, ".kpatch.data")?,
            section_bytes(&theirs, ".kpatch.data")?,
            "{peer}: .kpatch.data"
        );
        // Same code, apart from the relocated fields (which hold link-time values).
        let mut a = section_bytes(&ours, ".kpatch.text")?;
        let mut b = section_bytes(&theirs, ".kpatch.text")?;
        assert_eq!(a.len(), b.len(), "{peer}: .kpatch.text size");
        for off in landings(&ours, ".kpatch.text")?.keys() {
            let at = *off as usize;
            a[at..at + 4].fill(0);
            b[at..at + 4].fill(0);
        }
        assert_eq!(a, b, "{peer}: .kpatch.text code");
    }
    Ok(())
}

#[test]
fn libcare_patch_make_step_order_gives_the_same_patch() -> Result<()> {
    let a = pipeline_in(Variant::Pie, Order::StripUnneededFirst)?;
    let b = pipeline_in(Variant::Pie, Order::RelFixupFirst)?;
    check_stripped(Variant::Pie, &b.stripped)?;
    check_patch_elf(Variant::Pie, &b)?;
    let (ea, eb) = (std::fs::read(&a.patch_elf)?, std::fs::read(&b.patch_elf)?);
    for sec in [".kpatch.text", ".kpatch.info", ".eh_frame"] {
        assert_eq!(landings(&ea, sec)?, landings(&eb, sec)?, "{sec}");
    }
    for sec in [".kpatch.text", ".kpatch.data", ".kpatch.info", ".eh_frame"] {
        assert_eq!(section_bytes(&ea, sec)?, section_bytes(&eb, sec)?, "{sec}");
    }
    Ok(())
}
