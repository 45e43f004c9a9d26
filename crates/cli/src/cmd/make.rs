//! `kpatch_make`.

use std::process::ExitCode;

/// Flags of `kpatch_make`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hex build-id of the target object.
    #[arg(short = 'b', required = true)]
    pub build_id: String,
    /// Input ELF.
    pub input: std::path::PathBuf,
}

/// Runs `kpatch_make`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("kpatch_make")
}
