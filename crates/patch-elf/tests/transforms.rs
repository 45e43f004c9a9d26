//! One test per rel-fixup rule, on real gcc/ld output: an original program compiled from C,
//! the same program plus a hand-written `.kpatch.text` body linked with `-Wl,-q`, then
//! `strip` → system `strip --strip-unneeded` → `rel_fixup` (→ `undo_link`).

use std::process::Command;

use anyhow::{Context, Result};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, SectionHeader};
use object::{
    elf, Endianness, Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags,
    RelocationTarget,
};
use testkit::{gcc, run_ok, Link, Scratch};

/// The `.kpatch.*` sections gensrc would add for `report()` around `body`.
fn kpatch_part(body: &str, data: &str) -> String {
    format!(
        r#"
	.section	.kpatch.text,"ax",@progbits
	.globl	report.kpatch
	.type	report.kpatch, @function
report.kpatch:
{body}
.Lkp.end:
	.size	report.kpatch, .-report.kpatch
	.section	.kpatch.data,"aw",@progbits
	.string	"pad"
{data}
	.section	.kpatch.strtab,"a",@progbits
.Lkp.name:
	.string	"report"
	.section	.kpatch.info,"a",@progbits
	.quad	report
	.quad	report.kpatch
	.long	0
	.long	.Lkp.end - report.kpatch
	.quad	.Lkp.name
	.quad	0
	.long	0
	.long	0
	.zero	48
"#
    )
}

/// A built case: the original object and the stripped patch, ready for rel-fixup.
struct Case {
    _dir: Scratch,
    orig: Vec<u8>,
    stripped: Vec<u8>,
}

/// Compiles `c` to assembly, builds the original from it and the patched binary from it
/// plus `kpatch`, then strips the patched binary as the pipeline does.
fn build(c: &str, kpatch: &str, link: Link, cflags: &[&str], ldflags: &[&str]) -> Result<Case> {
    let dir = Scratch::new()?;
    let src = dir.write("prog.c", c)?;
    let orig_s = dir.join("orig.s");
    let mut flags = vec!["-S", "-O0"];
    flags.extend_from_slice(cflags);
    let pic = if link == Link::Shared {
        "-fPIC"
    } else {
        "-fPIE"
    };
    flags.push(pic);
    run_ok(
        Command::new("gcc")
            .args(&flags)
            .arg(&src)
            .arg("-o")
            .arg(&orig_s),
    )?;
    let orig_asm = std::fs::read_to_string(&orig_s)?;
    let aug_s = dir.write("aug.s", format!("{orig_asm}\n{kpatch}"))?;
    let out = |n: &str| dir.join(n);
    let orig_o = gcc(&[&orig_s], &out("orig.o"), Link::Object, &[])?;
    let aug_o = gcc(&[&aug_s], &out("aug.o"), Link::Object, &[])?;
    let orig = gcc(&[&orig_o], &out("orig"), link, &[])?;
    let mut ld = vec!["-Wl,-q"];
    ld.extend_from_slice(ldflags);
    let aug = gcc(&[&aug_o], &out("aug"), link, &ld)?;
    let stripped = patch_elf::strip(&std::fs::read(&aug)?)?;
    let s1 = dir.write("s1", &stripped)?;
    run_ok(Command::new("strip").arg("--strip-unneeded").arg(&s1))?;
    Ok(Case {
        orig: std::fs::read(&orig)?,
        stripped: std::fs::read(&s1)?,
        _dir: dir,
    })
}

/// A relocation of `.rela.kpatch.text` as seen by a reader.
#[derive(Debug)]
struct Rel {
    offset: u64,
    r_type: u32,
    symbol: String,
    symbol_is_section: bool,
    addend: i64,
}

fn kpatch_text(data: &[u8]) -> Result<(Vec<u8>, u64, Vec<Rel>)> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    let text = file
        .section_by_name(".kpatch.text")
        .context("no .kpatch.text")?;
    let mut rels = Vec::new();
    for (offset, r) in text.relocations() {
        let RelocationFlags::Elf { r_type } = r.flags() else {
            unreachable!()
        };
        let (symbol, symbol_is_section) = match r.target() {
            RelocationTarget::Symbol(idx) => {
                let s = file.symbol_by_index(idx)?;
                if s.kind() == object::SymbolKind::Section {
                    let sec = file.section_by_index(s.section_index().context("section")?)?;
                    (sec.name()?.to_string(), true)
                } else {
                    (s.name()?.to_string(), false)
                }
            }
            _ => (String::new(), false),
        };
        rels.push(Rel {
            // Section-relative, whether the file is still linked or already ET_REL.
            offset: offset - text.address(),
            r_type,
            symbol,
            symbol_is_section,
            addend: r.addend(),
        });
    }
    Ok((text.data()?.to_vec(), text.address(), rels))
}

const REPORT_C: &str = r#"
#include <stdio.h>
int counter;
void report(int n) { counter++; printf("report %d\n", n); }
int main(void) { report(1); return 0; }
"#;

#[test]
fn plt32_calls_become_pc32() -> Result<()> {
    let case = build(
        REPORT_C,
        &kpatch_part("\tcall\tputs@PLT\n\tret", ""),
        Link::Pie,
        &[],
        &[],
    )?;
    let (_, _, before) = kpatch_text(&case.stripped)?;
    assert!(
        before.iter().any(|r| r.r_type == elf::R_X86_64_PLT32),
        "ld should emit PLT32 for the call: {before:?}"
    );
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (_, _, after) = kpatch_text(&fixed)?;
    assert!(after.iter().all(|r| r.r_type != elf::R_X86_64_PLT32));
    let puts = after
        .iter()
        .find(|r| r.symbol.starts_with("puts"))
        .context("no relocation against puts")?;
    assert_eq!((puts.r_type, puts.addend), (elf::R_X86_64_PC32, -4));
    Ok(())
}

#[test]
fn compiler_local_symbol_becomes_section_relative() -> Result<()> {
    // A global `.L` label keeps ld from resolving it to a section itself (as a
    // --force-global build can); "pad\0" puts the label 4 bytes into .kpatch.data.
    let case = build(
        REPORT_C,
        &kpatch_part(
            "\tleaq\t.LC9.kpatch(%rip), %rdi\n\tret",
            "\t.globl\t.LC9.kpatch\n.LC9.kpatch:\n\t.string\t\"patched\"",
        ),
        Link::Pie,
        &[],
        &[],
    )?;
    let (_, _, before) = kpatch_text(&case.stripped)?;
    assert!(
        before.iter().any(|r| r.symbol == ".LC9.kpatch"),
        "{before:?}"
    );
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (_, _, after) = kpatch_text(&fixed)?;
    assert!(
        after.iter().all(|r| !r.symbol.starts_with(".L")),
        "{after:?}"
    );
    let r = &after[0];
    assert!(r.symbol_is_section && r.symbol == ".kpatch.data", "{r:?}");
    assert_eq!((r.r_type, r.addend), (elf::R_X86_64_PC32, 4 - 4));
    Ok(())
}

#[test]
fn gotpcrel_load_of_original_symbol_becomes_lea_pc32() -> Result<()> {
    // --no-relax keeps ld from turning the GOT load into a lea itself.
    let case = build(
        REPORT_C,
        &kpatch_part(
            "\tmovq\tcounter@GOTPCREL(%rip), %rax\n\tmovl\t(%rax), %eax\n\tret",
            "",
        ),
        Link::Pie,
        &[],
        &["-Wl,--no-relax"],
    )?;
    let (code, _, before) = kpatch_text(&case.stripped)?;
    let r = &before[0];
    assert_eq!(r.r_type, elf::R_X86_64_REX_GOTPCRELX, "{before:?}");
    let field = r.offset as usize;
    assert_eq!(code[field - 2], 0x8b, "still a mov before rel-fixup");

    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    let r = &after[0];
    assert_eq!(
        (r.r_type, r.symbol.as_str()),
        (elf::R_X86_64_PC32, "counter")
    );
    assert_eq!(
        &code[field - 3..field],
        &[0x48, 0x8d, 0x05],
        "mov became lea"
    );
    Ok(())
}

const TLS_C: &str = r#"
__thread int tfirst;
__thread int tcount = 7;
int get(void) { return tfirst + tcount; }
void report(int n) { tcount += n; }
int main(void) { report(1); return get(); }
"#;

/// The thread-pointer offset of TLS symbol `name` in `data` (x86-64 variant II).
fn tpoff_of(data: &[u8], name: &str) -> Result<i64> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    let e = file.endian();
    let tls = file
        .elf_program_headers()
        .iter()
        .find(|p| p.p_type(e) == elf::PT_TLS)
        .context("no PT_TLS")?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .context("no such symbol")?;
    let align = tls.p_align(e).max(1);
    let size = tls.p_memsz(e).div_ceil(align) * align;
    Ok(sym.address() as i64 - size as i64)
}

#[test]
fn tpoff32_keeps_the_original_tls_offset() -> Result<()> {
    let case = build(
        TLS_C,
        &kpatch_part("\tmovl\t%fs:tcount@tpoff, %eax\n\tret", ""),
        Link::Pie,
        &[],
        &[],
    )?;
    let (_, _, before) = kpatch_text(&case.stripped)?;
    let field = before
        .iter()
        .find(|r| r.r_type == elf::R_X86_64_TPOFF32)
        .with_context(|| format!("ld should emit TPOFF32: {before:?}"))?
        .offset as usize;
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    assert!(after.iter().all(|r| r.r_type != elf::R_X86_64_TPOFF32));
    let value = i32::from_le_bytes(code[field..field + 4].try_into()?);
    assert_eq!(i64::from(value), tpoff_of(&case.orig, "tcount")?);
    Ok(())
}

#[test]
fn tpoff32_against_a_different_tls_layout_is_refused() -> Result<()> {
    let case = build(
        TLS_C,
        &kpatch_part("\tmovl\t%fs:tcount@tpoff, %eax\n\tret", ""),
        Link::Pie,
        &[],
        &[],
    )?;
    // An "original" whose TLS block has one more variable: tcount moves.
    let other = build(
        &TLS_C.replace(
            "__thread int tfirst;",
            "__thread int tfirst, textra;\nint use(void) { return textra; }",
        ),
        &kpatch_part("\tret", ""),
        Link::Pie,
        &[],
        &[],
    )?;
    assert_ne!(
        tpoff_of(&other.orig, "tcount")?,
        tpoff_of(&case.orig, "tcount")?
    );
    let err = patch_elf::rel_fixup(&other.orig, &case.stripped).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, patch_elf::Error::TlsOffsetMismatch { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("tcount") && msg.contains(".kpatch.text"),
        "{msg}"
    );
    Ok(())
}

const EXTERN_TLS_C: &str = r#"
extern __thread int ext_tls;
int getx(void) { return ext_tls; }
void report(int n) { ext_tls += n; }
"#;

/// Link-time address of the original's GOT slot for TLS symbol `name` (its TPOFF64).
fn tpoff64_slot(data: &[u8], name: &str) -> Result<u64> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    let dynsyms = file.dynamic_symbol_table().context("no .dynsym")?;
    for (offset, r) in file
        .dynamic_relocations()
        .context("no dynamic relocations")?
    {
        if r.flags()
            != (RelocationFlags::Elf {
                r_type: elf::R_X86_64_TPOFF64,
            })
        {
            continue;
        }
        if let RelocationTarget::Symbol(idx) = r.target() {
            if dynsyms.symbol_by_index(idx)?.name()? == name {
                return Ok(offset);
            }
        }
    }
    anyhow::bail!("no TPOFF64 slot for {name}")
}

#[test]
fn gottpoff_points_at_the_original_got_slot() -> Result<()> {
    let case = build(
        EXTERN_TLS_C,
        &kpatch_part(
            "\tmovq\text_tls@gottpoff(%rip), %rax\n\tmovl\t%fs:(%rax), %eax\n\tret",
            "",
        ),
        Link::Shared,
        &["-ftls-model=initial-exec"],
        &[],
    )?;
    let (_, _, before) = kpatch_text(&case.stripped)?;
    assert_eq!(before[0].r_type, elf::R_X86_64_GOTTPOFF, "{before:?}");
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (_, _, after) = kpatch_text(&fixed)?;
    let r = &after[0];
    assert_eq!(r.r_type, elf::R_X86_64_PC32, "{after:?}");
    assert!(r.symbol_is_section && r.symbol == ".got", "{r:?}");

    let orig = ElfFile64::<Endianness>::parse(&*case.orig)?;
    let got = orig.section_by_name(".got").context("orig .got")?.address();
    let slot = tpoff64_slot(&case.orig, "ext_tls")?;
    assert_eq!(r.addend, (slot - got) as i64 - 4);

    // After undo-link the .got placeholder carries the original's address.
    let rel = patch_elf::undo_link(&case.orig, &fixed)?;
    let relf = ElfFile64::<Endianness>::parse(&*rel)?;
    assert_eq!(relf.section_by_name(".got").context(".got")?.address(), got);
    let (_, _, fin) = kpatch_text(&rel)?;
    assert_eq!((fin[0].symbol.as_str(), fin[0].addend), (".got", r.addend));
    Ok(())
}

const OWN_TLS_C: &str = r#"
__thread int own_tls = 5;
int getx(void) { return own_tls; }
void report(int n) { own_tls += n; }
"#;

/// `data16 lea x@tlsgd(%rip),%rdi; data16 data16 rex.W call __tls_get_addr@PLT`.
fn gd_plt(var: &str) -> String {
    format!("\t.byte\t0x66\n\tleaq\t{var}@tlsgd(%rip), %rdi\n\t.value\t0x6666\n\trex64\n\tcall\t__tls_get_addr@PLT\n")
}

/// The `-fno-plt` form: `data16 lea x@tlsgd(%rip),%rdi; data16 call *__tls_get_addr@GOTPCREL(%rip)`.
fn gd_got(var: &str) -> String {
    format!("\t.byte\t0x66\n\tleaq\t{var}@tlsgd(%rip), %rdi\n\t.byte\t0x66\n\trex64\n\tcall\t*__tls_get_addr@GOTPCREL(%rip)\n")
}

/// `mov %fs:0,%rax; add x@gottpoff(%rip),%rax` without the 4-byte field.
const IE_SEQ: [u8; 12] = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, 0x48, 0x03, 0x05];

#[test]
fn general_dynamic_tls_becomes_initial_exec_against_the_variable() -> Result<()> {
    // Both call forms, with a 2-byte mov after each: sequences at offsets 0 and 18.
    let body = format!(
        "{}\tmovl\t(%rax), %ecx\n{}\tmovl\t(%rax), %eax\n\tret",
        gd_plt("own_tls"),
        gd_got("own_tls")
    );
    let case = build(OWN_TLS_C, &kpatch_part(&body, ""), Link::Shared, &[], &[])?;
    let (code0, _, before) = kpatch_text(&case.stripped)?;
    let gd: Vec<u64> = before
        .iter()
        .filter(|r| r.r_type == elf::R_X86_64_TLSGD)
        .map(|r| r.offset)
        .collect();
    assert_eq!(gd, vec![4, 22], "{before:?}");
    assert_eq!(&code0[0..4], &[0x66, 0x48, 0x8d, 0x3d]);
    assert_eq!(&code0[26..30], &[0x66, 0x48, 0xff, 0x15]);

    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    for start in [0usize, 18] {
        assert_eq!(&code[start..start + 12], &IE_SEQ, "at {start}: {code:02x?}");
    }
    // The instructions around the sequences are untouched.
    assert_eq!(&code[16..18], &code0[16..18]);
    assert_eq!(&code[34..], &code0[34..]);
    assert!(
        after.iter().all(|r| r.symbol != "__tls_get_addr"
            && r.r_type != elf::R_X86_64_TLSGD
            && r.r_type != elf::R_X86_64_PLT32),
        "{after:?}"
    );
    let ie: Vec<(u64, &str, i64)> = after
        .iter()
        .filter(|r| r.r_type == elf::R_X86_64_GOTTPOFF)
        .map(|r| (r.offset, r.symbol.as_str(), r.addend))
        .collect();
    // The original has no TPOFF64 slot for its own GD variable: the GOTTPOFF stays,
    // against the variable, for the applier.
    assert_eq!(
        ie,
        vec![(12, "own_tls", -4), (30, "own_tls", -4)],
        "{after:?}"
    );

    let rel = patch_elf::undo_link(&case.orig, &fixed)?;
    let (_, _, fin) = kpatch_text(&rel)?;
    let ie: Vec<(u64, &str)> = fin
        .iter()
        .filter(|r| r.r_type == elf::R_X86_64_GOTTPOFF)
        .map(|r| (r.offset, r.symbol.as_str()))
        .collect();
    assert_eq!(ie, vec![(12, "own_tls"), (30, "own_tls")], "{fin:?}");
    Ok(())
}

#[test]
fn general_dynamic_tls_uses_the_original_initial_exec_slot_when_there_is_one() -> Result<()> {
    // ld itself relaxes this one to initial-exec (the object has a TPOFF slot for
    // ext_tls) but keeps the TLSGD/PLT32 pair in the emitted relocations.
    let body = format!("{}\tmovl\t(%rax), %eax\n\tret", gd_plt("ext_tls"));
    let case = build(
        EXTERN_TLS_C,
        &kpatch_part(&body, ""),
        Link::Shared,
        &["-ftls-model=initial-exec"],
        &[],
    )?;
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    assert_eq!(&code[0..12], &IE_SEQ);
    assert_eq!(after.len(), 1, "{after:?}");
    let r = &after[0];
    assert_eq!(r.r_type, elf::R_X86_64_PC32, "{after:?}");
    assert!(r.symbol_is_section && r.symbol == ".got", "{r:?}");
    let orig = ElfFile64::<Endianness>::parse(&*case.orig)?;
    let got = orig.section_by_name(".got").context("orig .got")?.address();
    let slot = tpoff64_slot(&case.orig, "ext_tls")?;
    assert_eq!((r.offset, r.addend), (12, (slot - got) as i64 - 4));
    Ok(())
}

#[test]
fn general_dynamic_tls_relaxed_to_local_exec_by_ld_keeps_the_original_offset() -> Result<()> {
    // In an executable ld relaxes the sequence to `mov %fs:0,%rax; lea x@tpoff(%rax),%rax`.
    let c = "__thread int exe_tls = 4;\nint report(int n) { return exe_tls + n; }\nint main(void) { return report(1); }\n";
    let body = format!("{}\tmovl\t(%rax), %eax\n\tret", gd_plt("exe_tls"));
    let case = build(c, &kpatch_part(&body, ""), Link::Pie, &[], &[])?;
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    assert_eq!(
        &code[0..12],
        &[0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0, 0x48, 0x8d, 0x80]
    );
    // A link-time constant, checked against the original and left in the code.
    assert!(after.is_empty(), "{after:?}");
    let want = tpoff_of(&case.orig, "exe_tls")?;
    assert_eq!(i32::from_le_bytes(code[12..16].try_into()?) as i64, want);
    Ok(())
}

const LOCAL_TLS_C: &str = "static __thread int local_tls = 3;\nint getx(void) { return local_tls; }\nvoid report(int n) { local_tls += n; }\n";

#[test]
fn local_dynamic_tls_becomes_thread_pointer_plus_tpoff32() -> Result<()> {
    // lea (7) + call (5), then `mov local_tls@dtpoff(%rax),%eax` (8b 80 <field>).
    let body = "\tleaq\tlocal_tls@tlsld(%rip), %rdi\n\tcall\t__tls_get_addr@PLT\n\tmovl\tlocal_tls@dtpoff(%rax), %eax\n\tret";
    let case = build(LOCAL_TLS_C, &kpatch_part(body, ""), Link::Shared, &[], &[])?;
    let (code0, _, before) = kpatch_text(&case.stripped)?;
    let kinds: Vec<(u64, u32)> = before.iter().map(|r| (r.offset, r.r_type)).collect();
    assert_eq!(
        kinds,
        vec![
            (3, elf::R_X86_64_TLSLD),
            (8, elf::R_X86_64_PLT32),
            (14, elf::R_X86_64_DTPOFF32)
        ],
        "{before:?}"
    );
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    // data16 data16 data16 mov %fs:0,%rax
    assert_eq!(
        &code[0..12],
        &[0x66, 0x66, 0x66, 0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0]
    );
    assert_eq!(&code[12..], &code0[12..]);
    let got: Vec<(u64, u32, &str, i64)> = after
        .iter()
        .map(|r| (r.offset, r.r_type, r.symbol.as_str(), r.addend))
        .collect();
    // The library's offsets are known only at run time: left to the applier.
    assert_eq!(
        got,
        vec![(14, elf::R_X86_64_TPOFF32, "local_tls", 0)],
        "{after:?}"
    );
    let rel = patch_elf::undo_link(&case.orig, &fixed)?;
    let (_, _, fin) = kpatch_text(&rel)?;
    assert_eq!(
        fin.iter()
            .map(|r| (r.offset, r.r_type, r.symbol.as_str()))
            .collect::<Vec<_>>(),
        vec![(14, elf::R_X86_64_TPOFF32, "local_tls")]
    );
    Ok(())
}

#[test]
fn local_dynamic_tls_outside_the_standard_sequence_is_refused_naming_type_section_and_offset(
) -> Result<()> {
    let body = "\tleaq\tlocal_tls@tlsld(%rip), %rdi\n\tmovl\t$0, %eax\n\tmovl\t$0, %eax\n\tret";
    let case = build(LOCAL_TLS_C, &kpatch_part(body, ""), Link::Shared, &[], &[])?;
    let (_, _, before) = kpatch_text(&case.stripped)?;
    let tlsld = before
        .iter()
        .find(|r| r.r_type == elf::R_X86_64_TLSLD)
        .with_context(|| format!("{before:?}"))?;
    let err = patch_elf::rel_fixup(&case.orig, &case.stripped).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("R_X86_64_TLSLD"), "{msg}");
    assert!(msg.contains(".kpatch.text"), "{msg}");
    assert!(msg.contains(&format!("{:#x}", tlsld.offset)), "{msg}");
    Ok(())
}

#[test]
fn rel_fixup_reads_a_non_elf_original_as_an_error() {
    let err = patch_elf::rel_fixup(b"not an elf", b"neither").unwrap_err();
    assert!(err.to_string().contains("original"), "{err}");
}

#[test]
fn strip_leaves_only_patch_bytes_even_after_system_strip() -> Result<()> {
    let case = build(
        REPORT_C,
        &kpatch_part("\tcall\tputs@PLT\n\tret", ""),
        Link::Pie,
        &[],
        &[],
    )?;
    let file = ElfFile64::<Endianness>::parse(&*case.stripped)?;
    let e = file.endian();
    let table = file.elf_section_table();
    for s in table.iter().skip(1) {
        let name = String::from_utf8_lossy(table.section_name(e, s)?).into_owned();
        let sh_type = s.sh_type(e);
        let patch = name.starts_with(".kpatch") || name == ".eh_frame";
        let patch_rela = name.starts_with(".rela.kpatch") || name == ".rela.eh_frame";
        let tables = matches!(name.as_str(), ".symtab" | ".strtab" | ".shstrtab");
        if sh_type == elf::SHT_RELA {
            assert!(patch_rela, "strip --strip-unneeded revived {name}");
        }
        if !(patch || patch_rela || tables) {
            assert_eq!(sh_type, elf::SHT_NOBITS, "{name} kept its bytes");
        }
    }
    for name in [
        ".kpatch.text",
        ".kpatch.info",
        ".eh_frame",
        ".rela.kpatch.info",
    ] {
        let s = file.section_by_name(name).context(name)?;
        assert!(!s.data()?.is_empty(), "{name} lost its bytes");
    }
    Ok(())
}

#[test]
fn strip_refuses_a_binary_without_kpatch_info() -> Result<()> {
    let dir = Scratch::new()?;
    let src = dir.write("plain.c", REPORT_C)?;
    let exe = gcc(&[&src], &dir.join("plain"), Link::Pie, &["-Wl,-q"])?;
    let err = patch_elf::strip(&std::fs::read(exe)?).unwrap_err();
    assert!(matches!(err, patch_elf::Error::NoPatchInfo), "{err}");
    Ok(())
}

#[test]
fn undo_link_makes_offsets_and_values_section_relative() -> Result<()> {
    let case = build(
        REPORT_C,
        &kpatch_part("\tcall\tputs@PLT\n\tret", ""),
        Link::NoPie,
        &[],
        &[],
    )?;
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let rel = patch_elf::undo_link(&case.orig, &fixed)?;
    let file = ElfFile64::<Endianness>::parse(&*rel)?;
    assert_eq!(file.elf_header().e_type(file.endian()), elf::ET_REL);
    assert!(file.elf_program_headers().is_empty());
    let kp = file
        .symbols()
        .find(|s| s.name() == Ok("report.kpatch"))
        .context("report.kpatch")?;
    assert_eq!(kp.address(), 0, "first function of .kpatch.text");
    // report() lives in the .text placeholder, which carries the original's address.
    let orig = ElfFile64::<Endianness>::parse(&*case.orig)?;
    let orig_report = orig
        .symbols()
        .find(|s| s.name() == Ok("report"))
        .context("orig report")?
        .address();
    let report = file
        .symbols()
        .find(|s| s.name() == Ok("report"))
        .context("report")?;
    let text = file.section_by_index(report.section_index().context("defined")?)?;
    assert_eq!(text.name()?, ".text");
    assert_eq!(text.address() + report.address(), orig_report);
    let (_, _, rels) = kpatch_text(&rel)?;
    assert!(rels.iter().all(|r| r.offset < 16), "{rels:?}");

    let again = patch_elf::undo_link(&case.orig, &rel).unwrap_err();
    assert!(
        matches!(again, patch_elf::Error::AlreadyRelocatable),
        "{again}"
    );
    Ok(())
}

/// A small deterministic generator, so a failing mutation can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn corrupted_inputs_give_errors_not_panics() -> Result<()> {
    let case = build(
        TLS_C,
        &kpatch_part(
            "\tmovl\t%fs:tcount@tpoff, %eax\n\tcall\tputs@PLT\n\tret",
            "",
        ),
        Link::Pie,
        &[],
        &[],
    )?;
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..400 {
        let mut bad = fixed.clone();
        // Hit the headers more often than the bodies: that is where the offsets live.
        let span = if round % 2 == 0 { 0x40 } else { bad.len() };
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() as usize) % span;
            bad[at] ^= 1 << (rng.next() % 8);
        }
        let res = std::panic::catch_unwind(|| {
            let _ = patch_elf::strip(&bad);
            let _ = patch_elf::rel_fixup(&case.orig, &bad);
            let _ = patch_elf::undo_link(&case.orig, &bad);
            let _ = patch_elf::rel_fixup(&bad, &fixed);
        });
        assert!(res.is_ok(), "round {round} panicked");
    }
    Ok(())
}

/// Link-time address of the original's GOT slot for `name` (its GLOB_DAT).
fn glob_dat_slot(data: &[u8], name: &str) -> Result<u64> {
    let file = ElfFile64::<Endianness>::parse(data)?;
    let dynsyms = file.dynamic_symbol_table().context("no .dynsym")?;
    for (offset, r) in file
        .dynamic_relocations()
        .context("no dynamic relocations")?
    {
        if r.flags()
            != (RelocationFlags::Elf {
                r_type: elf::R_X86_64_GLOB_DAT,
            })
        {
            continue;
        }
        if let RelocationTarget::Symbol(idx) = r.target() {
            if dynsyms.symbol_by_index(idx)?.name()? == name {
                return Ok(offset);
            }
        }
    }
    anyhow::bail!("no GLOB_DAT slot for {name}")
}

#[test]
fn gotpcrel_to_an_interposable_library_global_reads_the_original_got_slot() -> Result<()> {
    // In a shared library, `shared_counter` may live in the executable (copy
    // relocation): the patch must keep loading its address from the original's GOT.
    let c = "int shared_counter;\nint get(void) { return shared_counter; }\nvoid report(int n) { shared_counter += n; }\n";
    let case = build(
        c,
        &kpatch_part(
            "\tmovq\tshared_counter@GOTPCREL(%rip), %rax\n\tmovl\t(%rax), %eax\n\tret",
            "",
        ),
        Link::Shared,
        &[],
        &[],
    )?;
    let (code, _, before) = kpatch_text(&case.stripped)?;
    let field = before[0].offset as usize;
    assert_eq!(code[field - 2], 0x8b, "ld keeps the GOT load: {before:?}");
    let fixed = patch_elf::rel_fixup(&case.orig, &case.stripped)?;
    let (code, _, after) = kpatch_text(&fixed)?;
    let r = &after[0];
    assert_eq!(code[field - 2], 0x8b, "still a load from the GOT");
    assert_eq!(r.r_type, elf::R_X86_64_PC32, "{r:?}");
    assert!(r.symbol_is_section && r.symbol == ".got", "{r:?}");
    let orig = ElfFile64::<Endianness>::parse(&*case.orig)?;
    let got = orig.section_by_name(".got").context("orig .got")?.address();
    let slot = glob_dat_slot(&case.orig, "shared_counter")?;
    assert_eq!(r.addend, (slot - got) as i64 - 4);
    Ok(())
}

#[test]
fn strip_refuses_a_patched_binary_linked_without_emit_relocs() -> Result<()> {
    let dir = Scratch::new()?;
    let src = dir.write("prog.c", REPORT_C)?;
    let s = dir.join("prog.s");
    run_ok(
        Command::new("gcc")
            .args(["-S", "-O0"])
            .arg(&src)
            .arg("-o")
            .arg(&s),
    )?;
    let aug = format!(
        "{}\n{}",
        std::fs::read_to_string(&s)?,
        kpatch_part("\tret", "")
    );
    let aug_s = dir.write("aug.s", aug)?;
    let exe = gcc(&[&aug_s], &dir.join("aug"), Link::Pie, &[])?;
    let err = patch_elf::strip(&std::fs::read(exe)?).unwrap_err();
    assert!(matches!(err, patch_elf::Error::NoRelocations), "{err}");
    assert!(err.to_string().contains("-Wl,-q"), "{err}");
    Ok(())
}
