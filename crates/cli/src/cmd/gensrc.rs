//! `kpatch_gensrc`.

use std::process::ExitCode;

/// Flags of `kpatch_gensrc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Input assembly (once: filter; twice: diff).
    #[arg(short = 'i', required = true)]
    pub inputs: Vec<std::path::PathBuf>,
    /// Output assembly.
    #[arg(short = 'o')]
    pub output: Option<std::path::PathBuf>,
}

/// Runs `kpatch_gensrc`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("kpatch_gensrc")
}
