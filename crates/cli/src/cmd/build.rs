//! `livecare build`.

use std::process::ExitCode;

/// Flags of `livecare build`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source directory.
    #[arg(short = 'C', long = "srcdir")]
    pub srcdir: Option<std::path::PathBuf>,
    /// Patch diffs.
    pub patches: Vec<std::path::PathBuf>,
}

/// Runs `livecare build`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("livecare build")
}
