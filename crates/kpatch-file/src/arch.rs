//! Per-machine facts the container needs: names and widths of relocation types.
//! (Applying relocations is the applier's job; here they are only checked and shown.)

use object::elf;

/// The machines a patch may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Machine {
    /// `EM_X86_64`.
    X86_64,
    /// `EM_AARCH64` (accepted by the container; applying comes later).
    Aarch64,
}

impl Machine {
    /// The machine of an ELF `e_machine`, if supported.
    pub fn from_e_machine(e_machine: u16) -> Option<Machine> {
        match e_machine {
            elf::EM_X86_64 => Some(Machine::X86_64),
            elf::EM_AARCH64 => Some(Machine::Aarch64),
            _ => None,
        }
    }

    /// The relocation type's name, e.g. `R_X86_64_PC32`, or `R_X86_64_<n>` if unknown.
    pub fn reloc_name(self, r_type: u32) -> String {
        let known = match self {
            Machine::X86_64 => x86_64::name(r_type),
            Machine::Aarch64 => aarch64::name(r_type),
        };
        match (known, self) {
            (Some(n), _) => n.to_string(),
            (None, Machine::X86_64) => format!("R_X86_64_{r_type}"),
            (None, Machine::Aarch64) => format!("R_AARCH64_{r_type}"),
        }
    }

    /// Whether the relocation type does nothing (`R_X86_64_NONE`, `R_AARCH64_NONE`): a
    /// section of only these changes no byte, wherever it points.
    pub fn is_none_reloc(self, r_type: u32) -> bool {
        match self {
            Machine::X86_64 => r_type == elf::R_X86_64_NONE,
            // 256 is the withdrawn ELF32-style number some tools still emit.
            Machine::Aarch64 => r_type == elf::R_AARCH64_NONE || r_type == 256,
        }
    }

    /// How many bytes at `r_offset` the relocation writes (1 for unknown types, so the
    /// offset itself is still checked).
    pub fn reloc_width(self, r_type: u32) -> u64 {
        match self {
            Machine::X86_64 => x86_64::width(r_type),
            Machine::Aarch64 => aarch64::width(r_type),
        }
    }
}

mod x86_64 {
    use object::elf::*;

    pub fn name(t: u32) -> Option<&'static str> {
        Some(match t {
            R_X86_64_NONE => "R_X86_64_NONE",
            R_X86_64_64 => "R_X86_64_64",
            R_X86_64_PC32 => "R_X86_64_PC32",
            R_X86_64_GOT32 => "R_X86_64_GOT32",
            R_X86_64_PLT32 => "R_X86_64_PLT32",
            R_X86_64_COPY => "R_X86_64_COPY",
            R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
            R_X86_64_JUMP_SLOT => "R_X86_64_JUMP_SLOT",
            R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
            R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
            R_X86_64_32 => "R_X86_64_32",
            R_X86_64_32S => "R_X86_64_32S",
            R_X86_64_16 => "R_X86_64_16",
            R_X86_64_PC16 => "R_X86_64_PC16",
            R_X86_64_8 => "R_X86_64_8",
            R_X86_64_PC8 => "R_X86_64_PC8",
            R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
            R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
            R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
            R_X86_64_TLSGD => "R_X86_64_TLSGD",
            R_X86_64_TLSLD => "R_X86_64_TLSLD",
            R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
            R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
            R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
            R_X86_64_PC64 => "R_X86_64_PC64",
            R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
            R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
            R_X86_64_GOT64 => "R_X86_64_GOT64",
            R_X86_64_GOTPCREL64 => "R_X86_64_GOTPCREL64",
            R_X86_64_GOTPC64 => "R_X86_64_GOTPC64",
            R_X86_64_GOTPLT64 => "R_X86_64_GOTPLT64",
            R_X86_64_PLTOFF64 => "R_X86_64_PLTOFF64",
            R_X86_64_SIZE32 => "R_X86_64_SIZE32",
            R_X86_64_SIZE64 => "R_X86_64_SIZE64",
            R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
            R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
            R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
            R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
            R_X86_64_RELATIVE64 => "R_X86_64_RELATIVE64",
            R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
            R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
            _ => return None,
        })
    }

    pub fn width(t: u32) -> u64 {
        match t {
            R_X86_64_NONE | R_X86_64_TLSDESC_CALL => 0,
            R_X86_64_8 | R_X86_64_PC8 => 1,
            R_X86_64_16 | R_X86_64_PC16 => 2,
            R_X86_64_64 | R_X86_64_DTPMOD64 | R_X86_64_DTPOFF64 | R_X86_64_TPOFF64
            | R_X86_64_PC64 | R_X86_64_GOTOFF64 | R_X86_64_GOT64 | R_X86_64_GOTPCREL64
            | R_X86_64_GOTPC64 | R_X86_64_GOTPLT64 | R_X86_64_PLTOFF64 | R_X86_64_SIZE64
            | R_X86_64_RELATIVE64 | R_X86_64_GLOB_DAT | R_X86_64_JUMP_SLOT | R_X86_64_RELATIVE
            | R_X86_64_IRELATIVE => 8,
            R_X86_64_TLSDESC => 16,
            R_X86_64_COPY => 0,
            _ if name(t).is_some() => 4,
            _ => 1,
        }
    }
}

mod aarch64 {
    use object::elf::*;

    pub fn name(t: u32) -> Option<&'static str> {
        Some(match t {
            R_AARCH64_NONE => "R_AARCH64_NONE",
            R_AARCH64_ABS64 => "R_AARCH64_ABS64",
            R_AARCH64_ABS32 => "R_AARCH64_ABS32",
            R_AARCH64_ABS16 => "R_AARCH64_ABS16",
            R_AARCH64_PREL64 => "R_AARCH64_PREL64",
            R_AARCH64_PREL32 => "R_AARCH64_PREL32",
            R_AARCH64_PREL16 => "R_AARCH64_PREL16",
            R_AARCH64_ADR_PREL_PG_HI21 => "R_AARCH64_ADR_PREL_PG_HI21",
            R_AARCH64_ADD_ABS_LO12_NC => "R_AARCH64_ADD_ABS_LO12_NC",
            R_AARCH64_LDST8_ABS_LO12_NC => "R_AARCH64_LDST8_ABS_LO12_NC",
            R_AARCH64_LDST16_ABS_LO12_NC => "R_AARCH64_LDST16_ABS_LO12_NC",
            R_AARCH64_LDST32_ABS_LO12_NC => "R_AARCH64_LDST32_ABS_LO12_NC",
            R_AARCH64_LDST64_ABS_LO12_NC => "R_AARCH64_LDST64_ABS_LO12_NC",
            R_AARCH64_LDST128_ABS_LO12_NC => "R_AARCH64_LDST128_ABS_LO12_NC",
            R_AARCH64_JUMP26 => "R_AARCH64_JUMP26",
            R_AARCH64_CALL26 => "R_AARCH64_CALL26",
            R_AARCH64_CONDBR19 => "R_AARCH64_CONDBR19",
            R_AARCH64_ADR_GOT_PAGE => "R_AARCH64_ADR_GOT_PAGE",
            R_AARCH64_LD64_GOT_LO12_NC => "R_AARCH64_LD64_GOT_LO12_NC",
            _ => return None,
        })
    }

    pub fn width(t: u32) -> u64 {
        match t {
            R_AARCH64_NONE => 0,
            R_AARCH64_ABS64 | R_AARCH64_PREL64 => 8,
            R_AARCH64_ABS16 | R_AARCH64_PREL16 => 2,
            _ => 4,
        }
    }
}
