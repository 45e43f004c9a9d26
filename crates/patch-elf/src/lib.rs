//! Post-link ELF transforms on the patched binary: the `kpatch_strip` job.
//!
//! The patched binary is the original program linked (`-Wl,-q`) from augmented assembly:
//! the original code unchanged plus `.kpatch.text` / `.kpatch.data` / `.kpatch.info` /
//! `.kpatch.strtab` sections. Three steps turn it into the relocatable patch ELF that
//! `kpatch_make` wraps into a container:
//! [`strip`] (`--strip IN OUT`), then the system `strip --strip-unneeded`, then
//! [`rel_fixup`] (`--rel-fixup ORIG PATCH`) and [`undo_link`] (`--undo-link ORIG PATCH`).
//! Each takes bytes and returns bytes; edits go through `object::build::elf::Builder`.
//!
//! The caller is responsible for the files: reading ORIG read-only (it may be a running
//! executable), writing the result atomically, and running the system `strip`.
//! This crate solves the ELF surgery and checks every relocation it cannot carry over,
//! failing with the relocation type, the section and the offset.
//!
//! # The output ELF (what an applier can rely on)
//! After `strip` → `strip --strip-unneeded` → `rel_fixup` → `undo_link`:
//! - `e_type = ET_REL`, no program headers, `e_entry = 0`; x86-64 only for rel-fixup.
//! - **Patch sections** carry file bytes and have `sh_addr = 0`: every `.kpatch*` section
//!   (`.kpatch.text`, `.kpatch.data`, `.kpatch.info`, `.kpatch.strtab`, …), `.eh_frame`,
//!   their `.rela*` sections, `.symtab`, `.strtab`, `.shstrtab`.
//! - **Placeholders**: every other section of the linked binary that a symbol lives in
//!   (or that a kept section links to) stays in the section table, same name and size,
//!   as `SHT_NOBITS` with no file bytes; the others are dropped (a real program has tens
//!   of them, 64 header bytes each, that no applier reads). An allocated placeholder's
//!   `sh_addr` is the link-time address of the same-named section of ORIG (0 if ORIG has
//!   none), as in LibCare's output; its address at run time is that plus the load bias.
//!   Dropped relocation sections (`.rela.text`, `.rela.dyn`, …) are NOBITS with
//!   `SHF_ALLOC` and no `SHF_INFO_LINK`/`sh_link`/`sh_info`: binutils 2.40
//!   `strip --strip-unneeded` revives any non-alloc `.rela*` as a live relocation section
//!   full of `R_X86_64_NONE` (it keeps alloc ones NOBITS, but re-links them, which
//!   undo-link cuts again). So every `SHT_RELA` in the output belongs to a patch section.
//! - **Symbols**: `st_value` is relative to the symbol's section (section symbols: 0).
//!   A named symbol in a placeholder gets ORIG's offset for the same name, so
//!   `placeholder address + st_value` is the original's object. `STT_TLS` symbols hold
//!   their section-relative offset too. Undefined symbols (libc functions, imported data)
//!   keep ld's `name@VERSION` spelling.
//! - **Relocations** (`SHT_RELA`, `r_offset` relative to the target section) use only:
//!   `R_X86_64_64` (`.kpatch.info`: daddr → the original function's symbol, e.g. `report`
//!   in the `.text` placeholder; saddr → `report.kpatch`; symstr → `.kpatch.strtab` section
//!   symbol + offset), `PC32` (calls, rip-relative data, `.eh_frame` FDE starts:
//!   `.kpatch.text` section symbol + offset), `32`/`32S` (non-PIE absolute data), `PC64`,
//!   and `GOTPCREL`/`GOTPCRELX`/`REX_GOTPCRELX` **only against undefined symbols** or in
//!   front of a non-`mov` instruction (the applier gives them a jump-table slot as GOT
//!   entry). No `PLT32` remains (turned into `PC32`: calls to imports go through the
//!   applier's jump table). No `TPOFF32` in an executable's patch: local-exec TLS offsets
//!   are link-time constants, checked against ORIG's TLS layout and left in the code
//!   (a shared library's are not: see local-dynamic below). An initial-exec access
//!   (`GOTTPOFF`) becomes `PC32` against the placeholder of ORIG's GOT section (`.got`)
//!   with addend = the slot's offset in that section + the original addend. The one
//!   `GOTTPOFF` that remains: ORIG is a shared library that defines the variable but
//!   has no initial-exec (`TPOFF64`) slot for it; it stays `GOTTPOFF` against the named
//!   `STT_TLS` symbol (addend -4), and the applier puts the variable's thread-pointer
//!   offset, read from the running process, in a jump-table slot.
//!   General-dynamic accesses (`data16 lea x@tlsgd(%rip),%rdi` + `call __tls_get_addr`
//!   via PLT or `*GOTPCREL`, 16 bytes) are first rewritten the way ld relaxes them, to
//!   `mov %fs:0,%rax; add x@gottpoff(%rip),%rax` with one `GOTTPOFF` at sequence + 12
//!   (or, where ld already relaxed them to local-exec, a checked constant), so no
//!   `TLSGD` and no call to `__tls_get_addr` remain. Local-dynamic sequences
//!   (`lea x@tlsld(%rip),%rdi` + `call __tls_get_addr`, 12 or 13 bytes) become
//!   `data16… mov %fs:0,%rax`, and each `x@dtpoff` (`DTPOFF32`) a `TPOFF32`: checked
//!   and dropped for an executable as above, but kept against the named `STT_TLS`
//!   symbol when ORIG is a shared library, whose offsets only the applier can know.
//!   Any other use of `TLSLD`/`DTPOFF32`/`DTPOFF64` is refused.
//!   A `GOTPCREL` load of a defined symbol becomes `PC32` with `mov` rewritten to `lea`,
//!   except for an interposable global of a shared library (the executable may hold the
//!   live copy): that one becomes `PC32` against ORIG's GOT slot (`.got` placeholder +
//!   slot offset), keeping the `mov`, so it reads the address ld.so put there.
//!   References to compiler-local labels (`.L*`) are rewritten against section symbols.

mod arch;
mod fixup;
mod original;
mod strip;
mod undo;
mod validate;

use object::build::elf::Builder;

/// Why a transform failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not an ELF file this crate can read.
    #[error("cannot parse the {what} ELF: {reason}")]
    Parse {
        /// Which input ("original", "patched", "patch").
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The ELF could not be rewritten.
    #[error("cannot rewrite the ELF: {0}")]
    Build(String),
    /// The patched binary has no `.kpatch.info` section: it was not built from augmented assembly.
    #[error(
        "no .kpatch.info section: the input was not linked from augmented (kpatch_gensrc) assembly"
    )]
    NoPatchInfo,
    /// The patched binary kept no relocations for `.kpatch.info`.
    #[error(
        "no relocations for .kpatch.info: link the patched binary with -Wl,-q (--emit-relocs)"
    )]
    NoRelocations,
    /// Rel-fixup only knows x86-64.
    #[error("unsupported machine {0} (only x86-64 is supported)")]
    UnsupportedMachine(u16),
    /// Undo-link was given a relocatable object.
    #[error("the patch is already ET_REL (undo-link was run twice?)")]
    AlreadyRelocatable,
    /// A relocation this pipeline cannot carry over to the applier.
    #[error("unsupported relocation {r_type} in {section} at offset {offset:#x}: {why}")]
    UnsupportedRelocation {
        /// The relocation type's name.
        r_type: String,
        /// The section it patches.
        section: String,
        /// Offset in that section.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A relocation points outside the section it patches.
    #[error("relocation in {section} at offset {offset:#x} lies outside the section")]
    RelocationOutOfRange {
        /// The section it patches.
        section: String,
        /// The offending offset.
        offset: u64,
    },
    /// A local-exec TLS variable sits at another offset than in the original.
    #[error("TLS variable {symbol}: offset {patched:#x} in the patch differs from {original:#x} in the original ({section} at offset {offset:#x})")]
    TlsOffsetMismatch {
        /// The variable.
        symbol: String,
        /// Thread-pointer offset (plus addend) the patch was linked with.
        patched: i64,
        /// The original's.
        original: i64,
        /// The section holding the access.
        section: String,
        /// Offset of the access in that section.
        offset: u64,
    },
    /// A TLS variable the patch uses does not exist in the original.
    #[error("TLS variable {symbol} (used in {section} at offset {offset:#x}) is not defined in the original")]
    TlsSymbolMissing {
        /// The variable.
        symbol: String,
        /// The section holding the access.
        section: String,
        /// Offset of the access in that section.
        offset: u64,
    },
    /// An initial-exec TLS access whose GOT slot the original lacks.
    #[error("R_X86_64_GOTTPOFF against {symbol} in {section} at offset {offset:#x}: the original has no GOT slot (R_X86_64_TPOFF64) for it")]
    NoGotSlot {
        /// The variable.
        symbol: String,
        /// The section holding the access.
        section: String,
        /// Offset of the access in that section.
        offset: u64,
    },
}

/// `--strip IN OUT`: keeps `.kpatch*`, `.eh_frame`, their relocations and the symbol tables;
/// every other section becomes NOBITS without file bytes.
pub fn strip(input: &[u8]) -> Result<Vec<u8>, Error> {
    strip::strip(input)
}

/// `--rel-fixup ORIG PATCH`: rewrites the patch's relocations for the applier (see the crate doc).
pub fn rel_fixup(orig: &[u8], patch: &[u8]) -> Result<Vec<u8>, Error> {
    fixup::rel_fixup(orig, patch)
}

/// `--undo-link ORIG PATCH`: makes offsets and values section-relative and the file `ET_REL`.
pub fn undo_link(orig: &[u8], patch: &[u8]) -> Result<Vec<u8>, Error> {
    undo::undo_link(orig, patch)
}

/// Whether a section belongs to the patch proper (as opposed to the original program).
fn is_patch_section(name: &[u8]) -> bool {
    name.starts_with(b".kpatch")
}

fn read_builder<'d>(data: &'d [u8], what: &'static str) -> Result<Builder<'d>, Error> {
    let b = Builder::read(data).map_err(|e| Error::Parse {
        what,
        reason: e.to_string(),
    })?;
    // object's writer trusts these values; hostile ones make it panic or abort.
    validate::check(&b, data.len(), what)?;
    Ok(b)
}

fn write_builder(b: Builder<'_>) -> Result<Vec<u8>, object::build::Error> {
    let mut out = Vec::new();
    b.write(&mut out)?;
    Ok(out)
}

fn build_err(e: object::build::Error) -> Error {
    Error::Build(e.to_string())
}
