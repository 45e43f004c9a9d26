//! `patch`.

use std::process::ExitCode;

/// Flags of `patch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Process id or `all`.
    #[arg(short = 'p', required = true)]
    pub pid: String,
    /// Patch file or directory.
    pub patch: std::path::PathBuf,
}

/// Runs `patch`.
pub fn run(_args: Args, _face: super::Face) -> anyhow::Result<ExitCode> {
    super::not_implemented("patch")
}
