//! x86_64: `jmp rel32` hunks, `jmp *0(%rip)` jump-table entries, and the relocation
//! types of system.md §3.7.

use super::{PatchArch, RelocInput};
use object::elf;

/// The x86_64 implementation of [`PatchArch`].
pub struct Native;

/// `jmp rel32` opcode.
const JMP_REL32: u8 = 0xe9;
/// `jmp *0(%rip)`: the 8-byte target follows the 6-byte instruction.
const JMP_RIP_INDIRECT: [u8; 6] = [0xff, 0x25, 0, 0, 0, 0];
/// `mov r64, r/m64` opcode (rewritten to `lea` for local GOTPCREL targets).
const OP_MOV: u8 = 0x8b;
/// `lea r64, m` opcode.
const OP_LEA: u8 = 0x8d;

fn put(image: &mut [u8], off: usize, bytes: &[u8]) -> Result<(), String> {
    let dst = image
        .get_mut(off..off + bytes.len())
        .ok_or_else(|| format!("relocation offset {off:#x} outside the section"))?;
    dst.copy_from_slice(bytes);
    Ok(())
}

fn pc32(v: i128, what: &str) -> Result<[u8; 4], String> {
    i32::try_from(v)
        .map(|x| x.to_le_bytes())
        .map_err(|_| format!("{what} value {v:#x} overflows 32 bits"))
}

impl PatchArch for Native {
    const JUMP_LEN: usize = 5;
    const BREAKPOINT: &'static [u8] = &[0xcc];
    const JUMP_TABLE_ENTRY: usize = 16;
    const JUMP_TABLE_SLOT: usize = 6;

    fn jump(from: u64, to: u64) -> Option<Vec<u8>> {
        let rel = (to as i128) - (from as i128 + 5);
        let rel = i32::try_from(rel).ok()?;
        let mut v = vec![JMP_REL32];
        v.extend_from_slice(&rel.to_le_bytes());
        Some(v)
    }

    fn jump_table_entry(target: u64) -> Vec<u8> {
        let mut v = JMP_RIP_INDIRECT.to_vec();
        v.extend_from_slice(&target.to_le_bytes());
        v.resize(16, 0xcc);
        v
    }

    fn reloc_name(r_type: u32) -> String {
        let n = match r_type {
            elf::R_X86_64_64 => "R_X86_64_64",
            elf::R_X86_64_PC32 => "R_X86_64_PC32",
            elf::R_X86_64_32 => "R_X86_64_32",
            elf::R_X86_64_32S => "R_X86_64_32S",
            elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
            elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
            elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
            elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
            elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
            elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
            elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
            elf::R_X86_64_PC64 => "R_X86_64_PC64",
            elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
            elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
            elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
            _ => return format!("relocation type {r_type}"),
        };
        n.to_string()
    }

    fn needs_got(r_type: u32) -> bool {
        matches!(
            r_type,
            elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX
        )
    }

    fn is_tls(r_type: u32) -> bool {
        matches!(
            r_type,
            elf::R_X86_64_TPOFF32 | elf::R_X86_64_TPOFF64 | elf::R_X86_64_GOTTPOFF
        )
    }

    fn apply(image: &mut [u8], off: usize, r_type: u32, i: &RelocInput) -> Result<(), String> {
        let (s, a, p) = (i.s as i128, i.a as i128, i.p as i128);
        match r_type {
            elf::R_X86_64_64 => put(image, off, &((s + a) as u64).to_le_bytes()),
            elf::R_X86_64_PC64 => put(image, off, &((s + a - p) as u64).to_le_bytes()),
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                // A call to a far function goes through its jump-table entry.
                let direct = s + a - p;
                let v = match (i32::try_from(direct).is_ok(), i.got) {
                    (false, Some(g)) => g as i128 - Native::JUMP_TABLE_SLOT as i128 + a - p,
                    _ => direct,
                };
                put(image, off, &pc32(v, &Native::reloc_name(r_type))?)
            }
            elf::R_X86_64_32 => {
                let v = u32::try_from(s + a)
                    .map_err(|_| format!("R_X86_64_32 value {:#x} overflows", s + a))?;
                put(image, off, &v.to_le_bytes())
            }
            elf::R_X86_64_32S => put(image, off, &pc32(s + a, "R_X86_64_32S")?),
            elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                let opcode = off.checked_sub(2).and_then(|o| image.get(o)).copied();
                let direct = s + a - p;
                let fits = i32::try_from(direct).is_ok();
                if i.local && fits && opcode == Some(OP_MOV) {
                    // mov foo@GOTPCREL(%rip) → lea foo(%rip): same register, no GOT.
                    image[off - 2] = OP_LEA;
                    return put(image, off, &pc32(direct, "GOTPCREL")?);
                }
                if opcode == Some(OP_LEA) {
                    if i.local && fits {
                        // The linker already relaxed it to a lea of the symbol itself.
                        return put(image, off, &pc32(direct, "GOTPCREL (relaxed lea)")?);
                    }
                    // Relaxed against a copy in the patched binary, but the symbol
                    // lives elsewhere here: load its address from the GOT slot again.
                    if let Some(g) = i.got {
                        image[off - 2] = OP_MOV;
                        return put(image, off, &pc32(g as i128 + a - p, "GOTPCREL")?);
                    }
                }
                let g = i.got.ok_or("no GOT slot reserved")?;
                put(image, off, &pc32(g as i128 + a - p, "GOTPCREL")?)
            }
            elf::R_X86_64_TPOFF32 => {
                let t = i.tpoff.ok_or("no TLS offset for symbol")? as i128;
                put(image, off, &pc32(t + a, "R_X86_64_TPOFF32")?)
            }
            elf::R_X86_64_TPOFF64 => {
                let t = i.tpoff.ok_or("no TLS offset for symbol")? as i128;
                put(image, off, &((t + a) as u64).to_le_bytes())
            }
            elf::R_X86_64_GOTTPOFF => {
                let g = i.tpoff_slot.ok_or("no TLS offset slot reserved")?;
                put(image, off, &pc32(g as i128 + a - p, "R_X86_64_GOTTPOFF")?)
            }
            other => Err(format!(
                "unsupported relocation {}",
                Native::reloc_name(other)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_encodes_rel32_from_the_end_of_the_instruction() {
        assert_eq!(
            Native::jump(0x1000, 0x2000).unwrap(),
            vec![0xe9, 0xfb, 0x0f, 0, 0]
        );
        assert!(Native::jump(0, 1 << 40).is_none());
        let e = Native::jump_table_entry(0x1122_3344_5566_7788);
        assert_eq!(&e[..6], &[0xff, 0x25, 0, 0, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(e[6..14].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
    }

    #[test]
    fn gotpcrel_mov_to_local_becomes_lea() {
        // 48 8b 05 <rel32>: mov 0(%rip),%rax
        let mut img = vec![0x48, 0x8b, 0x05, 0, 0, 0, 0];
        let inp = RelocInput {
            s: 0x5000,
            a: -4,
            p: 0x1003,
            local: true,
            got: None,
            tpoff: None,
            tpoff_slot: None,
        };
        Native::apply(&mut img, 3, elf::R_X86_64_REX_GOTPCRELX, &inp).unwrap();
        assert_eq!(img[1], 0x8d);
        assert_eq!(
            i32::from_le_bytes(img[3..7].try_into().unwrap()),
            0x5000 - 4 - 0x1003
        );
    }

    #[test]
    fn pc32_overflow_is_an_error_naming_the_type() {
        let mut img = vec![0; 8];
        let inp = RelocInput {
            s: 1 << 40,
            a: 0,
            p: 0,
            local: true,
            got: None,
            tpoff: None,
            tpoff_slot: None,
        };
        let e = Native::apply(&mut img, 0, elf::R_X86_64_PC32, &inp).unwrap_err();
        assert!(e.contains("R_X86_64_PC32"), "{e}");
        assert!(Native::apply(&mut img, 0, 99, &inp)
            .unwrap_err()
            .contains("unsupported"));
    }
}
