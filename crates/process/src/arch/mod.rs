//! Architecture-specific register and syscall details behind [`ProcessArch`].

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{Native, Regs};

/// What the generic code needs to know about an architecture to run remote syscalls.
pub trait ProcessArch {
    /// The register file as ptrace returns it.
    type Regs: Copy;
    /// The bytes of the syscall instruction.
    const SYSCALL_INSN: &'static [u8];
    /// Sets up `regs` to execute syscall `nr` with `args` at the instruction at `pc`,
    /// with syscall restart disabled.
    fn prepare_syscall(regs: &mut Self::Regs, pc: u64, nr: u64, args: &[u64; 6]);
    /// The syscall return value after it executed.
    fn syscall_result(regs: &Self::Regs) -> i64;
    /// Program counter.
    fn pc(regs: &Self::Regs) -> u64;
    /// Stack pointer.
    fn sp(regs: &Self::Regs) -> u64;
}
