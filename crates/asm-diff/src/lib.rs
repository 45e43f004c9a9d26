//! GNU as (AT&T) assembly diff: the `kpatch_gensrc` job.
//!
//! What it does: given the assembly gcc emitted for one C file before and after a
//! source change, it finds the functions whose code changed (compiler renumbering,
//! line-number directives and `.file` names are not changes) and emits the original
//! assembly unchanged plus `<fn>.kpatch` copies of the new bodies in `.kpatch.text`,
//! their literals in `.kpatch.data`, and `.kpatch.info`/`.kpatch.strtab` records that
//! tell the applier which original function each copy replaces.
//!
//! What the caller is responsible for: feeding assembly of the same C file built with
//! the same flags (the build wrapper's job), and assembling/linking the result.
//!
//! What it solves: parsing gcc 12 output at every optimisation level (cold parts,
//! `.part`/`.isra`/`.constprop` clones, jump tables, TLS, PIC, DWARF 5), correlating
//! blocks by normalised name, and refusing changes that cannot be live-patched
//! (variable layout, TLS, constructors, functions shorter than a jump) with an error
//! that names the block.
//!
//! Speed: one pass classifies every line (zero-copy slices of the input), one pass
//! builds the block model, and only functions are tokenised for comparison; literal
//! contents are normalised once and cached. Everything is hash-map based, so work
//! is linear in the input (about 3 million lines/s on the SQLite amalgamation).

mod diff;
mod emit;
pub mod model;
pub mod parse;

pub use diff::{filter, gensrc};

/// Options of `kpatch_gensrc`.
#[derive(Default, Clone, Debug)]
pub struct Options {
    /// Mark every function the patch touches (original and copy) `.globl`.
    pub force_global: bool,
    /// Route every reference from patch code to a non-patch variable through the GOT.
    pub force_gotpcrel: bool,
    /// Treat functions whose only change is shifted `__LINE__` constants as unchanged.
    pub ignore_line_macros: bool,
    /// Report unknown directives and other notes as warnings.
    pub verbose: bool,
}

/// Result of a two-input run.
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// The augmented assembly.
    pub asm: String,
    /// Functions of the original that are replaced (original names).
    pub changed: Vec<String>,
    /// Functions new in the patched file (patched names).
    pub added: Vec<String>,
    /// Non-fatal findings (line-macro-only changes, GOT routing gaps, unknown directives).
    pub warnings: Vec<String>,
}

/// Why a diff was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An existing variable changed initial value, size, alignment or section.
    #[error("variable `{name}` changed its {what}; existing variables cannot be changed by a live patch")]
    VariableChanged {
        /// Variable name (original).
        name: String,
        /// Which property changed.
        what: &'static str,
    },
    /// A thread-local variable was added or changed.
    #[error("thread-local variable `{name}` {what}; TLS layout cannot be changed by a live patch")]
    TlsChanged {
        /// Variable name.
        name: String,
        /// `changed` or `added`.
        what: &'static str,
    },
    /// Constructors or destructors changed.
    #[error(
        "section `{section}` changed; constructors/destructors cannot be changed by a live patch"
    )]
    InitArrayChanged {
        /// Section name.
        section: String,
    },
    /// The original function is too short for a 5-byte jump.
    #[error("function `{name}` is about {size} bytes long in the original, shorter than the 5-byte jump a patch needs")]
    FunctionTooShort {
        /// Function name.
        name: String,
        /// Estimated size in bytes.
        size: usize,
    },
}
