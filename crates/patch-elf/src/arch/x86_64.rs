//! x86-64 relocation types and the instruction rewrites rel-fixup performs on them.

use object::elf;

/// Name of an x86-64 relocation type, as readelf prints it.
pub fn reloc_name(r_type: u32) -> String {
    let name = match r_type {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_COPY => "R_X86_64_COPY",
        elf::R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
        elf::R_X86_64_JUMP_SLOT => "R_X86_64_JUMP_SLOT",
        elf::R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_GOT64 => "R_X86_64_GOT64",
        elf::R_X86_64_GOTPCREL64 => "R_X86_64_GOTPCREL64",
        elf::R_X86_64_GOTPC64 => "R_X86_64_GOTPC64",
        elf::R_X86_64_GOTPLT64 => "R_X86_64_GOTPLT64",
        elf::R_X86_64_PLTOFF64 => "R_X86_64_PLTOFF64",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        other => return format!("relocation type {other}"),
    };
    name.to_string()
}

/// What rel-fixup does with a relocation of a given type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Types the applier resolves as they are (`NONE`, `64`, `PC32`, `32`, `32S`, `PC64`).
    Plain,
    /// A call through the PLT: becomes `PC32` (the applier's jump table replaces the PLT).
    Plt,
    /// A load of a symbol address from the GOT (`GOTPCREL`, `GOTPCRELX`, `REX_GOTPCRELX`).
    GotPcRel,
    /// Local-exec TLS: a link-time constant offset from the thread pointer.
    TpOff32,
    /// Initial-exec TLS: a load of the thread-pointer offset from a GOT slot.
    GotTpOff,
    /// Everything else (general/local-dynamic TLS, TLS descriptors, GOT-relative...).
    Unsupported,
}

/// Classifies a relocation type for rel-fixup.
pub fn classify(r_type: u32) -> Class {
    match r_type {
        elf::R_X86_64_NONE
        | elf::R_X86_64_64
        | elf::R_X86_64_PC32
        | elf::R_X86_64_32
        | elf::R_X86_64_32S
        | elf::R_X86_64_PC64 => Class::Plain,
        elf::R_X86_64_PLT32 => Class::Plt,
        elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
            Class::GotPcRel
        }
        elf::R_X86_64_TPOFF32 => Class::TpOff32,
        elf::R_X86_64_GOTTPOFF => Class::GotTpOff,
        _ => Class::Unsupported,
    }
}

/// The PC-relative 32-bit type every rewritten reference ends up as.
pub const R_PC32: u32 = elf::R_X86_64_PC32;

/// Opcode of `mov r/m64, r64` (a GOT load).
const OPCODE_MOV: u8 = 0x8b;
/// Opcode of `lea m, r64` (the same operand, used as an address).
const OPCODE_LEA: u8 = 0x8d;

/// How the instruction in front of a GOT-relative field reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GotLoad {
    /// `mov foo@GOTPCREL(%rip), %reg`: can become `lea foo(%rip), %reg`.
    Mov,
    /// Already `lea foo(%rip), %reg` (the linker relaxed it).
    Lea,
    /// Anything else (`call *foo@GOTPCREL(%rip)`, `add`, a relaxed `mov $imm`...).
    Other,
}

/// Whether the ModRM byte just before a 32-bit field encodes a `disp32(%rip)` operand.
fn is_rip_relative(modrm: u8) -> bool {
    modrm & 0xc7 == 0x05
}

/// Reads the instruction that owns the GOT-relative field starting at `field` in `code`.
pub fn got_load_at(code: &[u8], field: usize) -> GotLoad {
    if field < 2 {
        return GotLoad::Other;
    }
    let (Some(&opcode), Some(&modrm)) = (code.get(field - 2), code.get(field - 1)) else {
        return GotLoad::Other;
    };
    if !is_rip_relative(modrm) {
        return GotLoad::Other;
    }
    match opcode {
        OPCODE_MOV => GotLoad::Mov,
        OPCODE_LEA => GotLoad::Lea,
        _ => GotLoad::Other,
    }
}

/// Rewrites the `mov` in front of the field at `field` into a `lea` of the same operand.
pub fn mov_to_lea(code: &mut [u8], field: usize) {
    if let Some(op) = field.checked_sub(2).and_then(|i| code.get_mut(i)) {
        *op = OPCODE_LEA;
    }
}

/// Whether an initial-exec TLS access at `field` still loads from the GOT
/// (`mov x@gottpoff(%rip), %reg` / `add x@gottpoff(%rip), %reg`), rather than having been
/// relaxed by the linker into a local-exec immediate (`mov $x@tpoff, %reg`).
pub fn gottpoff_uses_got(code: &[u8], field: usize) -> bool {
    field
        .checked_sub(1)
        .and_then(|i| code.get(i))
        .is_some_and(|&modrm| is_rip_relative(modrm))
}
