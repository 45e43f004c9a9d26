//! `livecare demo`.

use std::process::ExitCode;

/// Flags of `livecare demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep the temporary directory.
    #[arg(long)]
    pub keep: bool,
}

/// Runs `livecare demo`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    super::not_implemented("livecare demo")
}
