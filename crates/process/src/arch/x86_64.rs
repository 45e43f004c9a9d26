//! x86_64: `user_regs_struct`, the `syscall` instruction and syscall numbers.

use super::ProcessArch;

/// The register file (`struct user_regs_struct`).
pub type Regs = libc::user_regs_struct;

/// The x86_64 implementation of [`ProcessArch`].
pub struct Native;

/// `mmap` syscall number.
pub const SYS_MMAP: u64 = 9;
/// `mprotect` syscall number.
pub const SYS_MPROTECT: u64 = 10;
/// `munmap` syscall number.
pub const SYS_MUNMAP: u64 = 11;

impl ProcessArch for Native {
    type Regs = Regs;
    const SYSCALL_INSN: &'static [u8] = &[0x0f, 0x05];

    fn prepare_syscall(regs: &mut Regs, pc: u64, nr: u64, args: &[u64; 6]) {
        regs.rip = pc;
        regs.rax = nr;
        // orig_rax = -1: the kernel must not "restart" the syscall the thread was
        // interrupted in by moving rip back over our instruction.
        regs.orig_rax = u64::MAX;
        regs.rdi = args[0];
        regs.rsi = args[1];
        regs.rdx = args[2];
        regs.r10 = args[3];
        regs.r8 = args[4];
        regs.r9 = args[5];
    }

    fn syscall_result(regs: &Regs) -> i64 {
        regs.rax as i64
    }

    fn pc(regs: &Regs) -> u64 {
        regs.rip
    }

    fn sp(regs: &Regs) -> u64 {
        regs.rsp
    }
}
