//! `livecare inspect`.

use std::process::ExitCode;

/// Flags of `livecare inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The .kpatch file.
    pub file: std::path::PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `livecare inspect`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("livecare inspect")
}
