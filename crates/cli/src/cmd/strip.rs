//! `kpatch_strip`.

use std::process::ExitCode;

/// Flags of `kpatch_strip`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Strip mode.
    #[arg(long, num_args = 2)]
    pub strip: Option<Vec<std::path::PathBuf>>,
}

/// Runs `kpatch_strip`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("kpatch_strip")
}
