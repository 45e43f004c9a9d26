//! Unwinding through patch code that has no usable `.eh_frame` (patches made by
//! LibCare or LibcarePlus, issue 18.5).
//!
//! Such code is livecare's own region: its functions' entries and the addresses their
//! callers call (the original entry, or the new one where call sites were redirected)
//! are known. A frame in it is stepped strictly or not at all: the stack depth at the
//! frame's pc comes from the function's prologue (`push`, `sub rsp, imm` from its entry
//! up to the first branch), and the word found at that depth is accepted as the return
//! address only if the instruction before it is a call of this very function (directly,
//! through a PLT or jump-table stub, or through a GOT slot). Anything else (a pc outside
//! a known function, a prologue that moves `rsp` another way, a caller that calls
//! through a register) leaves the step undone, and the caller keeps treating the thread
//! as busy without knowing where it returns.

use std::ops::Range;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// One function of [`BareCode`].
#[derive(Clone, Debug)]
pub struct BareFn {
    /// Its code.
    pub code: Range<u64>,
    /// Addresses a call of it targets: its original entry (which jumps here) and its own.
    pub callees: Vec<u64>,
}

/// Code livecare placed in the target whose CFI is missing.
#[derive(Clone, Debug)]
pub struct BareCode {
    /// Its addresses.
    pub range: Range<u64>,
    /// Its bytes, from `range.start`.
    pub bytes: Vec<u8>,
    /// The functions whose frames can be stepped.
    pub functions: Vec<BareFn>,
}

/// One frame stepped: where it returns, its CFA, the caller's `rbp` (`None`: unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BareStep {
    pub ra: u64,
    pub cfa: u64,
    pub rbp: Option<u64>,
}

/// The stack state of a function at one instruction, from its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prologue {
    /// Bytes pushed or reserved below the return address.
    depth: u64,
    /// Depth at which `rbp` was pushed (before the push), while it stays saved.
    rbp_at: Option<u64>,
    /// Depth copied into `rbp` by `mov rbp, rsp` (restored by `leave`).
    fp_depth: Option<u64>,
}

impl BareCode {
    /// The step out of a frame at `pc` (`top`: the innermost frame, whose pc has not
    /// executed; otherwise `pc` is a return address) with stack pointer `rsp`; `None`
    /// when it cannot be proven.
    pub(crate) fn step(
        &self,
        pc: u64,
        top: bool,
        rsp: u64,
        rbp: Option<u64>,
        read: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Option<BareStep> {
        let lookup = if top { pc } else { pc.checked_sub(1)? };
        let f = self.functions.iter().find(|f| f.code.contains(&lookup))?;
        let start = f.code.start.checked_sub(self.range.start)? as usize;
        let end = f.code.end.checked_sub(self.range.start)? as usize;
        let code = self.bytes.get(start..end)?;
        let (p, rbp_clobbered) = prologue(code, f.code.start, pc)?;
        let slot = rsp.checked_add(p.depth)?;
        let ra = read(slot)?;
        if !calls_one_of(ra, &f.callees, read) {
            return None;
        }
        let cfa = slot.checked_add(8)?;
        let rbp = match p.rbp_at {
            // Pushed at depth d: stored at (cfa - 8) - d - 8.
            Some(d) => Some(read(cfa.checked_sub(16 + d)?)?),
            None if rbp_clobbered => None,
            None => rbp,
        };
        Some(BareStep { ra, cfa, rbp })
    }
}

/// Most instructions followed through one function.
const MAX_STEPS: usize = 20_000;

/// The stack state at `pc` of the function at `entry` (bytes `code`), by following
/// every path from its entry as objtool does: pushes, pops, `sub`/`add rsp, imm`,
/// `lea rsp, [rsp+imm]`, `mov rbp, rsp` and `leave` move the depth; both ways of every
/// conditional branch are followed. `None` (not provable) when `pc` is not reached,
/// two paths reach an instruction with different states, `rsp` is changed another way,
/// or a path leaves the function (`ret`, tail jump) with its frame not popped.
/// Also says whether a reached instruction may change `rbp` while it is not saved.
fn prologue(code: &[u8], entry: u64, pc: u64) -> Option<(Prologue, bool)> {
    let end = entry + code.len() as u64;
    let mut seen: std::collections::HashMap<u64, Prologue> = Default::default();
    let mut work = vec![(
        entry,
        Prologue {
            depth: 0,
            rbp_at: None,
            fp_depth: None,
        },
    )];
    let mut rbp_clobbered = false;
    let mut steps = 0;
    let mut ins = Instruction::default();
    while let Some((mut ip, mut st)) = work.pop() {
        loop {
            steps += 1;
            if steps > MAX_STEPS || ip >= end {
                return None;
            }
            match seen.get(&ip) {
                Some(old) if *old == st => break,
                Some(_) => return None,
                None => {
                    seen.insert(ip, st);
                }
            }
            let off = (ip - entry) as usize;
            let mut d = Decoder::with_ip(64, &code[off..], ip, DecoderOptions::NONE);
            d.decode_out(&mut ins);
            if ins.is_invalid() {
                return None;
            }
            let next = ins.next_ip();
            let rsp = [Register::RSP, Register::ESP, Register::SP, Register::SPL];
            let rbp = [Register::RBP, Register::EBP, Register::BP, Register::BPL];
            let imm = |ins: &Instruction| match ins.op1_kind() {
                OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate32 => {
                    u64::try_from(ins.immediate(1) as i64).ok()
                }
                _ => None,
            };
            if op0_is(&ins, &rbp) && ins.mnemonic() != Mnemonic::Push && st.rbp_at.is_none() {
                rbp_clobbered = true;
            }
            match ins.mnemonic() {
                Mnemonic::Push | Mnemonic::Pushfq => {
                    if op0_is(&ins, &[Register::RBP]) && st.rbp_at.is_none() {
                        st.rbp_at = Some(st.depth);
                    }
                    st.depth += 8;
                }
                Mnemonic::Pop | Mnemonic::Popfq => {
                    st.depth = st.depth.checked_sub(8)?;
                    if op0_is(&ins, &[Register::RBP]) && st.rbp_at == Some(st.depth) {
                        st.rbp_at = None;
                    }
                    if op0_is(&ins, &rsp) {
                        return None;
                    }
                }
                Mnemonic::Sub if op0_is(&ins, &[Register::RSP]) => {
                    st.depth = st.depth.checked_add(imm(&ins)?)?;
                }
                Mnemonic::Add if op0_is(&ins, &[Register::RSP]) => {
                    st.depth = st.depth.checked_sub(imm(&ins)?)?;
                }
                Mnemonic::Lea if op0_is(&ins, &[Register::RSP]) => {
                    if ins.memory_base() != Register::RSP || ins.memory_index() != Register::None {
                        return None;
                    }
                    let disp = ins.memory_displacement64() as i64;
                    st.depth = st.depth.checked_add_signed(disp.checked_neg()?)?;
                }
                Mnemonic::Mov if op0_is(&ins, &[Register::RBP]) => {
                    if ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::RSP {
                        st.fp_depth = Some(st.depth);
                    } else {
                        st.fp_depth = None;
                    }
                }
                Mnemonic::Mov if op0_is(&ins, &[Register::RSP]) => {
                    if ins.op1_kind() != OpKind::Register || ins.op1_register() != Register::RBP {
                        return None;
                    }
                    st.depth = st.fp_depth?;
                }
                Mnemonic::Leave => {
                    st.depth = st.fp_depth?.checked_sub(8)?;
                    if st.rbp_at == Some(st.depth) {
                        st.rbp_at = None;
                    }
                    st.fp_depth = None;
                }
                Mnemonic::Ret | Mnemonic::Retf => {
                    if st.depth != 0 {
                        return None;
                    }
                    break;
                }
                Mnemonic::Int3 | Mnemonic::Ud2 | Mnemonic::Hlt => break,
                Mnemonic::Enter => return None,
                _ if op0_is(&ins, &rsp) => return None,
                _ => {}
            }
            if op0_is(&ins, &rbp) && ins.mnemonic() != Mnemonic::Mov {
                st.fp_depth = None;
            }
            let direct = matches!(
                ins.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            );
            match ins.mnemonic() {
                Mnemonic::Call => {}
                Mnemonic::Jmp => {
                    let target = ins.near_branch_target();
                    if direct && (entry..end).contains(&target) {
                        ip = target;
                        continue;
                    }
                    // A tail call must leave no frame; the targets of an indirect
                    // jump are unknown, so the path stops there.
                    if direct && st.depth != 0 {
                        return None;
                    }
                    break;
                }
                _ if direct => {
                    // Conditional branch: both ways.
                    let target = ins.near_branch_target();
                    if (entry..end).contains(&target) {
                        work.push((target, st));
                    } else if st.depth != 0 {
                        return None;
                    }
                }
                _ => {}
            }
            ip = next;
        }
    }
    seen.get(&pc).map(|st| (*st, rbp_clobbered))
}

/// Whether the first operand of `ins` is one of `regs` (the destination, for the
/// instructions that write one).
fn op0_is(ins: &Instruction, regs: &[Register]) -> bool {
    ins.op_count() > 0 && ins.op0_kind() == OpKind::Register && regs.contains(&ins.op0_register())
}

/// Whether the instruction just before `ra` is a call of one of `callees`: `call rel32`
/// to it or to a stub `[endbr64] [bnd] jmp [rip+disp]` whose slot holds it, or
/// `call [rip+disp]` whose slot holds it.
fn calls_one_of(ra: u64, callees: &[u64], read: &mut dyn FnMut(u64) -> Option<u64>) -> bool {
    let Some(before) = ra.checked_sub(8).and_then(&mut *read) else {
        return false;
    };
    let b = before.to_le_bytes();
    let rel = |o: usize| i32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as i64;
    // call rel32: e8 at ra - 5.
    if b[3] == 0xe8 {
        let target = ra.wrapping_add_signed(rel(4));
        if callees.contains(&target) {
            return true;
        }
        return stub_jumps_to(target, callees, read);
    }
    // call [rip+disp32]: ff 15 at ra - 6.
    if b[2] == 0xff && b[3] == 0x15 {
        let slot = ra.wrapping_add_signed(rel(4));
        return read(slot).is_some_and(|v| callees.contains(&v));
    }
    false
}

/// Whether the code at `at` is a jump through a memory slot holding one of `callees`
/// (a PLT entry, `.plt.sec`, or a patch's jump-table entry).
fn stub_jumps_to(at: u64, callees: &[u64], read: &mut dyn FnMut(u64) -> Option<u64>) -> bool {
    let mut bytes = Vec::with_capacity(16);
    for w in 0..2u64 {
        match read(at.wrapping_add(w * 8)) {
            Some(v) => bytes.extend_from_slice(&v.to_le_bytes()),
            None => return false,
        }
    }
    let mut d = Decoder::with_ip(64, &bytes, at, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut ins);
        match ins.mnemonic() {
            Mnemonic::Endbr64 | Mnemonic::Nop => continue,
            Mnemonic::Jmp if ins.is_ip_rel_memory_operand() => {
                let slot = ins.ip_rel_memory_address();
                return read(slot).is_some_and(|v| callees.contains(&v));
            }
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `push rbx; sub rsp, 0x10; call x` stepped from just after the call.
    #[test]
    fn a_prologue_gives_the_return_slot_checked_by_the_callers_call() {
        // push rbx; sub rsp,0x10; call +0; add rsp,0x10; pop rbx; ret
        let code = [
            0x53, 0x48, 0x83, 0xec, 0x10, 0xe8, 0, 0, 0, 0, 0x48, 0x83, 0xc4, 0x10, 0x5b, 0xc3,
        ];
        let entry = 0x10_000;
        let bare = BareCode {
            range: entry..entry + code.len() as u64,
            bytes: code.to_vec(),
            functions: vec![BareFn {
                code: entry..entry + code.len() as u64,
                callees: vec![0x20_000],
            }],
        };
        // Caller at 0x30_000: call 0x20_000 (e8 rel32), returning to 0x30_005.
        let ra = 0x30_005u64;
        let rel = (0x20_000i64 - ra as i64) as i32;
        let mut caller = [0u8; 8];
        caller[3] = 0xe8;
        caller[4..].copy_from_slice(&rel.to_le_bytes());
        let rsp = 0x7000u64;
        let mut read = |a: u64| match a {
            0x7018 => Some(ra),
            0x7010 => Some(0x1234), // saved rbx
            a if a == ra - 8 => Some(u64::from_le_bytes(caller)),
            _ => None,
        };
        let pc = entry + 10; // after the call
        let s = bare.step(pc, false, rsp, Some(7), &mut read).unwrap();
        assert_eq!(
            s,
            BareStep {
                ra,
                cfa: 0x7020,
                rbp: Some(7)
            }
        );
        // A caller that did not call this function is not accepted.
        let mut other = |a: u64| match a {
            0x7018 => Some(ra),
            a if a == ra - 8 => Some(0),
            _ => None,
        };
        assert_eq!(bare.step(pc, false, rsp, Some(7), &mut other), None);
        // Mid-prologue (after push rbx only): the slot is one word up.
        let mut read0 = |a: u64| match a {
            0x7008 => Some(ra),
            a if a == ra - 8 => Some(u64::from_le_bytes(caller)),
            _ => None,
        };
        let s = bare.step(entry + 1, true, rsp, None, &mut read0).unwrap();
        assert_eq!(s.cfa, 0x7010);
    }
}
