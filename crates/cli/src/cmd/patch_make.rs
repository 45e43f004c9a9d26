//! `libcare-patch-make`.

use std::process::ExitCode;

/// Flags of `libcare-patch-make`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Patches.
    pub patches: Vec<std::path::PathBuf>,
}

/// Runs `libcare-patch-make`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("libcare-patch-make")
}
