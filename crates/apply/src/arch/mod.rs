//! Architecture-specific patching details behind [`PatchArch`].

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::Native;

/// Where a relocation wants its value to come from.
#[derive(Debug, Clone, Copy)]
pub struct RelocInput {
    /// Symbol address (S).
    pub s: u64,
    /// Addend (A).
    pub a: i64,
    /// Address of the place being relocated (P).
    pub p: u64,
    /// True when S lies in the original object or the patch (a `mov` from the GOT
    /// may become a PC-relative `lea`).
    pub local: bool,
    /// Address of a GOT-like slot holding S (jump-table entry), if one was reserved.
    pub got: Option<u64>,
    /// Thread-pointer offset of a TLS symbol (for TPOFF*, GOTTPOFF).
    pub tpoff: Option<i64>,
    /// Address of a slot holding `tpoff` (for GOTTPOFF).
    pub tpoff_slot: Option<u64>,
}

/// What the generic applier needs from an architecture.
pub trait PatchArch {
    /// Size of the jump written at each patched function's entry.
    const JUMP_LEN: usize;
    /// The breakpoint instruction.
    const BREAKPOINT: &'static [u8];
    /// Size of a jump-table entry.
    const JUMP_TABLE_ENTRY: usize;
    /// Offset of the 8-byte address inside a jump-table entry (the GOT slot).
    const JUMP_TABLE_SLOT: usize;
    /// The jump from `from` to `to`, or None if out of range.
    fn jump(from: u64, to: u64) -> Option<Vec<u8>>;
    /// A jump-table entry that jumps to `target`.
    fn jump_table_entry(target: u64) -> Vec<u8>;
    /// Name of relocation type `r_type`.
    fn reloc_name(r_type: u32) -> String;
    /// True if relocations of this type need a GOT slot for their symbol.
    fn needs_got(r_type: u32) -> bool;
    /// True for TLS relocation types.
    fn is_tls(r_type: u32) -> bool;
    /// Applies one relocation at `image[off..]`.
    fn apply(image: &mut [u8], off: usize, r_type: u32, input: &RelocInput) -> Result<(), String>;
}
