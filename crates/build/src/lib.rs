//! Builds live patches from source diffs: the `libcare-cc` compiler wrapper (original
//! and patched stages) and the orchestration behind `livecare build` and
//! `libcare-patch-make`.
//!
//! You are responsible for a tree that builds with one command (default `make -jN`)
//! using `$CC` or `cc`/`gcc` from PATH, and for diffs that apply with `patch -p1`.
//! This crate solves the rest: it builds the original tree exactly as a plain build
//! would (same build-ids) while keeping each object's assembly, applies the diffs,
//! rebuilds incrementally from augmented assembly (checking that no original code byte
//! moved), turns every changed program or library into `<buildid>.kpatch`, and puts
//! the original source back, also when a stage fails.

pub mod args;
pub mod deployed;
pub mod pipeline;
pub mod private_tree;
pub mod progress;
pub mod project;
pub mod verify;
pub mod wrapper;

pub use args::{CompilerArgs, Input, Lang, Mode};
pub use progress::{Progress, Step, Style};
pub use project::{
    default_workdir, BuildError, Isolation, MadePatch, Options, OriginalOutput, Session,
};
pub use wrapper::{Stage, WrapperEnv, WrapperError};
